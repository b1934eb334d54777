"""The APTP router: a learned architecture predictor plus K architecture codes.

``scores = cos(w * hard_gates(predictor(z)), w * hard_gates(codes))``  (B, K), where w = 1/sqrt(n_g)
normalises every unit group to the same weight. Training routes through a Balancer (optimal
transport: balanced experts); inference takes the argmax of the scores. Gates are deterministic
unless ``noise=True`` is asked for (training).

The router needs the unit space: call :meth:`OTRouter.bind` (a freshly built router is unbound).
Its saved tensors carry the unit space (as JSON bytes), so ``load_state_tensors`` binds a fresh
router and refuses tensors made for another unit space (IncompatibleError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from aptp.core.errors import ConfigError, IncompatibleError, ShapeError
from aptp.core.interfaces import LearnedRouter
from aptp.core.units import UnitSpace
from aptp.routers._checks import check_embeddings
from aptp.routers.predictor import ArchitectureCodes, ArchitecturePredictor, RawLayout

UNIT_SPACE_KEY = "unit_space_json"  # uint8 tensor: UnitSpace.to_dict() as UTF-8 JSON


@dataclass
class OTRouterConfig:
    """APTP's router: predictor + codes, balanced by optimal transport in training.

    Training assignment is the balancer's (``balancer.rounding``): ``argmax`` of the transport plan
    is the paper's; ``balanced`` (the default, exactly floor/ceil B/K prompts per code) is kept as
    the default because argmax collapses onto code 0 while the codes tie (the orthogonal init: all
    codes start fully kept); see :class:`aptp.routers.balancers.SinkhornConfig` for the figures.
    Both routing and the contrastive loss compare :meth:`OTRouter.normalised_gates`.
    """

    num_experts: int = 8  # K (the paper: 8; 16 for its largest model)
    hidden_dim: Optional[int] = None  # None: linear heads (the paper); else a hidden layer of this width
    tau: float = 0.4  # Gumbel-sigmoid temperature
    offset: float = 3.0  # Gumbel-sigmoid offset: positive keeps units at initialisation
    # "cosine" (the paper) or "correlation": cosine of the gate vectors centred on their own mean,
    # which ignores how dense an architecture is and compares only which units it keeps. With
    # cosine, predictions denser than the codes all score highest on the densest code.
    similarity: str = "cosine"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1 (the paper uses 8).")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be >= 1, or null for linear heads.")
        from aptp.core import values

        values.positive("tau", self.tau, "(the Gumbel-sigmoid temperature; the paper uses 0.4)")
        values.finite("offset", self.offset, "(the Gumbel-sigmoid offset, e.g. 3.0)")
        if self.similarity not in ("cosine", "correlation"):
            raise ValueError(f"similarity={self.similarity!r} must be 'cosine' (the paper) or 'correlation'.")


def encode_unit_space(unit_space: UnitSpace) -> torch.Tensor:
    """UnitSpace -> uint8 tensor of its JSON (storable in safetensors)."""
    return torch.frombuffer(bytearray(json.dumps(unit_space.to_dict()).encode()), dtype=torch.uint8).clone()


def decode_unit_space(data: torch.Tensor) -> UnitSpace:
    return UnitSpace.from_dict(json.loads(bytes(data.to(torch.uint8).tolist()).decode()))


class OTRouter(LearnedRouter):
    """APTP router: architecture predictor + K codes, routed by optimal transport in training."""

    config_class = OTRouterConfig

    def __init__(self, config: OTRouterConfig | None = None) -> None:
        super().__init__(config)
        self.unit_space: UnitSpace | None = None
        self.layout: RawLayout | None = None
        self.predictor: ArchitecturePredictor | None = None
        self.codes: ArchitectureCodes | None = None

    # --- setup ----------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def bound(self) -> bool:
        return self.unit_space is not None

    @property
    def embed_dim(self) -> int | None:
        return self.predictor.embed_dim if self.predictor is not None else None

    def bind(self, unit_space: UnitSpace, embed_dim: int) -> OTRouter:
        """Create the predictor (D -> R) and the codes (K, R) for ``unit_space``; returns self."""
        if self.bound:
            if unit_space.fingerprint() == self.unit_space.fingerprint() and embed_dim == self.embed_dim:
                return self
            self.unit_space.require_same(unit_space.fingerprint(), "this router")
            raise IncompatibleError(f"this router is bound to D={self.embed_dim}, not D={embed_dim}.")
        if unit_space.size < 1:
            raise ConfigError("the unit space has no units (U=0); choose granularities that find prunable units.")
        if embed_dim < 1:
            raise ConfigError(f"embed_dim={embed_dim} must be >= 1 (the prompt encoder's width D).")
        self.unit_space = unit_space
        self.layout = RawLayout(unit_space)
        self.predictor = ArchitecturePredictor(embed_dim, self.layout.raw_sizes, self.config.hidden_dim)
        self.codes = ArchitectureCodes(self.config.num_experts, self.layout.raw_size)
        return self

    def _require_bound(self) -> None:
        if not self.bound:
            raise ConfigError(
                "the 'ot' router is not bound to a unit space: call router.bind(unit_space, embed_dim) "
                "or load saved router tensors first."
            )

    # --- logits and gates -----------------------------------------------------------------------
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Predicted unit logits e (B, U) of prompt embeddings z (B, D)."""
        self._require_bound()
        z = check_embeddings(z, self.embed_dim)
        return self.layout.unit_logits(self.predictor(z.to(self.codes.weight.dtype)))  # (B, U)

    def code_logits(self) -> torch.Tensor:
        """Unit logits of the K codes, (K, U)."""
        self._require_bound()
        return self.layout.unit_logits(self.codes())  # (K, U)

    def predicted_gates(self, z: torch.Tensor, noise: bool = False, hard: bool = True) -> torch.Tensor:
        """Gates (B, U) of the predicted architectures (straight-through when hard)."""
        self._require_bound()
        c = self.config
        return self.layout.gates(self.predict(z), c.tau, c.offset, noise=noise, hard=hard)

    def code_gates(self, noise: bool = False, hard: bool = True) -> torch.Tensor:
        """Gates (K, U) of the codes (straight-through when hard)."""
        self._require_bound()
        c = self.config
        return self.layout.gates(self.code_logits(), c.tau, c.offset, noise=noise, hard=hard)

    @torch.no_grad()
    def init_codes_from_predictions(self, z: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Set the K codes to the k-means centres of the predictor's raw logits on prompts ``z`` (N, D).

        An option, not in the paper (which keeps the orthogonal init): starting each code at the
        centre of a cluster of predicted architectures makes the inference routing (argmax cosine
        to the codes) agree with the balanced training routing from the first step after warm-up,
        instead of sending every prompt to whichever code the untrained codes favour. Returns the
        cluster of each prompt, (N,).
        """
        from sklearn.cluster import KMeans

        self._require_bound()
        z = check_embeddings(z, self.embed_dim)
        k = self.config.num_experts
        if z.shape[0] < k:
            raise ConfigError(f"need at least num_experts={k} prompts to initialise the codes, got {z.shape[0]}.")
        raw = self.predictor(z.to(self.codes.weight.dtype))  # (N, R)
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(raw.double().cpu().numpy())
        self.codes.weight.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.codes.weight.dtype))
        return torch.as_tensor(km.labels_, dtype=torch.long)

    @torch.no_grad()
    def init_codes_from_groups(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Set code k to the mean of the predictor's raw logits on the prompts ``z`` (N, D) labelled
        k (``labels`` (N,) in [0, K)): the k-means init when a fixed router chose the groups.
        Codes without prompts keep their value."""
        self._require_bound()
        z = check_embeddings(z, self.embed_dim)
        if labels.shape != (z.shape[0],):
            raise ShapeError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}.")
        raw = self.predictor(z.to(self.codes.weight.dtype))  # (N, R)
        for k in range(self.config.num_experts):
            rows = labels == k
            if bool(rows.any()):
                self.codes.weight[k] = raw[rows].mean(0)

    @torch.no_grad()
    def architectures(self) -> torch.Tensor:
        """The experts' architectures: deterministic hard code gates, (K, U) float in {0, 1}."""
        return self.code_gates(noise=False, hard=True).detach().clone()

    def normalised_gates(self, z: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """Predicted architectures as routing compares them, (B, U): the hard (straight-through)
        gates of prompts ``z`` (B, D), each unit weighted by 1/sqrt(its group's size) so that every
        fully kept group has norm 1. Also the architecture vector of APTP's contrastive loss (as in
        the original code), whose gradient reaches the predictor through the straight-through gates."""
        self._require_bound()
        return self.predicted_gates(z, noise=noise, hard=True) * self.layout.group_weight.to(self.codes.weight)

    def normalised_code_gates(self, noise: bool = False) -> torch.Tensor:
        """The codes' hard gates weighted like :meth:`normalised_gates`, (K, U)."""
        self._require_bound()
        return self.code_gates(noise=noise, hard=True) * self.layout.group_weight.to(self.codes.weight)

    def scores(self, z: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """Cosine similarity (or correlation) of group-normalised hard gates, prompts vs codes, (B, K)."""
        self._require_bound()
        g_pred = self.normalised_gates(z, noise=noise)  # (B, U)
        g_code = self.normalised_code_gates(noise=noise)  # (K, U)
        if self.config.similarity == "correlation":
            g_pred = g_pred - g_pred.mean(dim=-1, keepdim=True)
            g_code = g_code - g_code.mean(dim=-1, keepdim=True)
        return F.normalize(g_pred, dim=-1, eps=1e-8) @ F.normalize(g_code, dim=-1, eps=1e-8).T  # (B, K)

    # --- persistence ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.bound:
            return {}
        return {**{k: v for k, v in self.state_dict().items()}, UNIT_SPACE_KEY: encode_unit_space(self.unit_space)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        if UNIT_SPACE_KEY not in tensors:
            raise IncompatibleError(
                f"these tensors are not a saved 'ot' router (no {UNIT_SPACE_KEY!r}; keys: {sorted(tensors)[:5]})."
            )
        tensors = dict(tensors)
        space = decode_unit_space(tensors.pop(UNIT_SPACE_KEY))
        if "predictor.hidden.0.weight" in tensors:
            embed_dim = tensors["predictor.hidden.0.weight"].shape[1]
        else:
            embed_dim = tensors["predictor.heads.weight"].shape[1]
        if self.bound:
            self.unit_space.require_same(space.fingerprint(), "the saved router")
        k_saved = tensors["codes.weight"].shape[0]
        if k_saved != self.num_experts:
            raise IncompatibleError(
                f"the saved router has K={k_saved} codes, this one is configured with num_experts="
                f"{self.num_experts}; set num_experts={k_saved}."
            )
        self.bind(space, embed_dim)
        try:
            self.load_state_dict(tensors)
        except RuntimeError as exc:
            raise IncompatibleError(
                f"the saved router does not fit this config ({exc}); check hidden_dim (null or the saved width)."
            ) from None


def check_architectures(arch: torch.Tensor, unit_space: UnitSpace, num_experts: int) -> torch.Tensor:
    """Architectures (K, U) of ``num_experts`` experts over ``unit_space``, or ShapeError."""
    if arch.dim() != 2 or arch.shape != (num_experts, unit_space.size):
        raise ShapeError(
            f"architectures must have shape (K={num_experts}, U={unit_space.size}), got {tuple(arch.shape)}."
        )
    return arch
