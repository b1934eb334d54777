"""The abstract interfaces every component implements, and the small types they exchange.

A component is a class with a ``config_class`` (a dataclass: the component's parameters) whose
constructor takes one instance of it. Components are registered by name through the hooks in
:mod:`aptp.core.hookspecs` and named in YAML configs.

The flow of one prompt::

    prompt --PromptEncoder--> z (B, D) --Router--> expert id (B,)
           --Assignment--> architecture (K, U) --Granularity--> gates (training) | cut (expert)
           --Backbone--> denoiser + scheduler + text encoder (+ VAE) --> image
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from aptp.core.units import UnitGroup, UnitSpace

if TYPE_CHECKING:
    from aptp.core.build import Composition


@dataclass
class NoConfig:
    """Config of a component without parameters."""


class Component:
    """Base of every component: holds its config dataclass as ``self.config``."""

    config_class: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__()  # cooperative: lets nn.Module initialise in subclasses that mix it in
        self.config = config if config is not None else self.config_class()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config, restore this component (saved as safetensors)."""
        return dict(self.state_dict()) if isinstance(self, nn.Module) else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`. Override when shapes depend on fitted data."""
        if isinstance(self, nn.Module):
            self.load_state_dict(tensors)
        elif tensors:
            raise ValueError(f"{type(self).__name__} stores no tensors, got {sorted(tensors)}.")


# --------------------------------------------------------------------------------------- backbone
#: How a backbone calls its denoiser: ``call(denoiser, sample (B, C, H, W), t (B,), text (B, L, D))``.
DenoiserCall = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Conditioning:
    """Shapes a denoiser is called with, and how its backbone calls it.

    ``call`` is the backbone's :meth:`Backbone.trace_call` (what the MACs tracer runs to build the
    unit space); it takes no part in equality or hashing. None (a conditioning written by hand, or
    read back from a saved expert without its backbone): the tracer's default for bare diffusers
    denoisers."""

    sample_shape: tuple[int, int, int]  # (C, H, W) of the denoiser's input (latent or pixels)
    text_len: int  # L, number of text tokens cross-attended to
    text_dim: int  # D_text, width of the text encoder's hidden states
    call: DenoiserCall | None = field(default=None, compare=False, repr=False)


@dataclass
class BackboneModules:
    """The loaded parts of a text-to-image model."""

    denoiser: nn.Module
    scheduler: Any  # the sampler / noise schedule (a diffusers scheduler for the built-in backbones)
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    vae: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backbone(Component, abc.ABC):
    """A text-to-image model (denoiser, text encoder, scheduler, VAE): it owns how its model is
    built, called, sampled, trained and stored.

    The adapters live in :mod:`aptp.backbones` (:class:`aptp.backbones.diffusers_base.DiffusersBackbone`
    implements everything but the first five methods for models run by a diffusers scheduler); a new
    backbone is one file there (or in a plugin) and one entry point. Shapes: sample and latents
    (B, C, H, W) with (C, H, W) = ``conditioning().sample_shape``; timestep (B,); text states
    (B, L, D_text); images (B, 3, H', W').
    """

    # --- the model ------------------------------------------------------------------------------
    @abc.abstractmethod
    def conditioning(self) -> Conditioning:
        """Input shapes of the denoiser at the configured resolution (with ``call=self.trace_call``)."""

    @abc.abstractmethod
    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BackboneModules:
        """Load (pretrained weights) or build (random weights, from a config) every part."""

    @abc.abstractmethod
    def build_denoiser(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The denoiser alone (``device='meta'`` builds shapes only, without memory)."""

    @abc.abstractmethod
    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        """One denoiser call: sample (B, C, H, W), timestep (B,), text_states (B, L, D) -> (B, C, H, W)."""

    @abc.abstractmethod
    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        """Text encoder hidden states for the denoiser, (B, L, D_text)."""

    def trace_call(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                   text_states: torch.Tensor) -> Any:
        """How the MACs tracer calls the denoiser (one forward on the ``meta`` device, batch 1):
        sample (B, C, H, W), timestep (B,) long, text_states (B, L, D) -> anything. Default:
        :meth:`denoise`; a backbone whose model needs MACs formulas registers them here first
        (:func:`aptp.core.resources.register_macs_formula`)."""
        return self.denoise(denoiser, sample, timestep, text_states)

    @abc.abstractmethod
    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Modules whose outputs block-feature distillation matches (UNets: every down, mid and up
        block). Their output widths are never pruned, so teacher and expert features align."""

    # --- images <-> denoiser space ----------------------------------------------------------------
    @abc.abstractmethod
    def to_latents(self, modules: BackboneModules, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H', W') in [-1, 1] -> denoiser space (B, C, H, W): VAE latents or pixels.

        ``eps`` (B, C, H, W) samples the VAE posterior (mean + std * eps); None takes its mean."""

    @abc.abstractmethod
    def decode(self, modules: BackboneModules, sample: torch.Tensor) -> torch.Tensor:
        """Denoiser space (B, C, H, W) -> images (B, 3, H', W') in [0, 1]."""

    # --- sampling and training --------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, modules: BackboneModules, prompts: Sequence[str], *, denoiser: nn.Module | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Sample images (B, 3, H', W') in [0, 1] for ``prompts`` with ``denoiser`` (default: the
        dense one) and a fresh copy of the backbone's scheduler; classifier-free guidance when
        ``guidance_scale > 1`` (the unconditional prompt is the empty string). ``latents`` (B, C, H, W)
        is the initial noise; drawn from ``generator`` when not given. No gradients."""

    @abc.abstractmethod
    def add_noise(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The noisy sample the denoiser sees at training timestep t: x0, noise (B, C, H, W),
        timesteps (B,) long in ``[0, scheduler.config.num_train_timesteps)`` -> x_t (B, C, H, W)
        (``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` for DDPM-family schedules, ``(1 - sigma) x0 + sigma eps``
        for rectified flow)."""

    @abc.abstractmethod
    def training_target(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at ``x_t = add_noise(scheduler, x0, noise, t)``:
        x0, noise (B, C, H, W), timesteps (B,) -> target (B, C, H, W) (noise for epsilon prediction,
        the velocity for v-prediction and flow matching)."""

    @abc.abstractmethod
    def loss_weights(self, scheduler: Any, timesteps: torch.Tensor,
                     min_snr_gamma: float | None) -> torch.Tensor:
        """Per-sample weights (B,) of the denoising loss at ``timesteps`` (B,): Min-SNR-gamma
        (Hang et al. 2023) in the terms of this backbone's noise schedule and training target; ones
        when ``min_snr_gamma`` is None or <= 0."""

    # --- experts on disk --------------------------------------------------------------------------
    @abc.abstractmethod
    def save_denoiser(self, denoiser: nn.Module, directory: str | Path) -> None:
        """Write a (cut) denoiser's weights, and what rebuilds its dense form, into ``directory``."""

    @abc.abstractmethod
    def dense_denoiser_for(self, directory: str | Path) -> nn.Module:
        """The dense denoiser a saved one was cut from, with shapes only (``meta`` device): loading
        an expert cuts it to the stored architecture and then assigns the saved weights."""

    @abc.abstractmethod
    def load_denoiser_state(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """The weights :meth:`save_denoiser` wrote, as a state dict."""


# ------------------------------------------------------------------------------------ granularity
#: Returns the current gates of one unit group, (B, n_units), or None when the model runs ungated.
GateGetter = Callable[[], "torch.Tensor | None"]


class UnitChannels(NamedTuple):
    """A width unit group as channels: unit ``j`` is input channels ``[j s, (j+1) s)`` of ``layer``."""

    layer: nn.Module  # the consumer whose input channels the gate scales (e.g. a ResNet's conv2)
    channels_per_unit: int  # s


class Granularity(Component, abc.ABC):
    """A kind of prunable unit: finds the unit groups in a denoiser, gates them, cuts them.

    A gate multiplies activations exactly where the physical cut removes them, so that a model
    with hard gates and the cut model compute the same function. ``kind`` is its registered name
    (the ``kind`` of its unit groups); a depth granularity gives its groups ``unit_paths``
    (:attr:`~aptp.core.units.UnitGroup.is_depth`).
    """

    kind: ClassVar[str]
    #: Where this kind's groups go in a unit space: lower first, ties in the order the
    #: granularities are given. The layout (and so the fingerprint of saved runs) depends on it:
    #: the built-ins are resnet_channels 0, attention_heads 1, ffn 2, depth 3; others follow.
    order: ClassVar[int] = 100

    @abc.abstractmethod
    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        """Every unit group of this kind in ``denoiser``, with MACs and parameters per unit."""

    @abc.abstractmethod
    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> Any:
        """Install the gate of ``group``; returns a handle with ``.remove()``."""

    @abc.abstractmethod
    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        """Physically remove the units of ``group`` where ``keep`` (n_units,) is False, in place."""

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """L2 norm of the weights each unit's cut removes, (n_units,): the magnitude criterion.

        Optional; granularities without a meaningful weight norm (e.g. depth) need not define it,
        and magnitude pruning then keeps their units."""
        raise NotImplementedError(f"granularity {type(self).__name__} defines no weight magnitude")

    def unit_channels(self, denoiser: nn.Module, group: UnitGroup) -> UnitChannels:
        """Where a channel pruner cuts ``group``: the layer whose *input* channels carry the units
        (the layer the gate multiplies into) and how many contiguous channels each unit owns.

        Optional; it lets an external dependency-graph pruner (torch-pruning, see
        :mod:`aptp.pruners.torch_pruning_cut`) cut this granularity. Units that are not channels (depth) do
        not define it."""
        raise NotImplementedError(f"granularity {type(self).__name__} is not a channel granularity")


# ----------------------------------------------------------------------------- encoder / routing
class PromptEncoder(Component, abc.ABC):
    """Frozen prompt encoder: prompts -> embeddings z (B, D)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D, the embedding width."""

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings (B, D), float32, on CPU."""


class Balancer(Component, abc.ABC):
    """Turns routing scores (B, K) into a transport plan whose columns are balanced."""

    @abc.abstractmethod
    def plan(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, K), higher is better -> plan (B, K), rows sum to 1/B, columns to 1/K."""

    def assign(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert id of each row, (B,) long: argmax of the plan."""
        return self.plan(scores).argmax(dim=-1)


@dataclass
class RoutingResult:
    """Where each prompt goes."""

    expert_ids: torch.Tensor  # (B,) long in [0, K)
    scores: torch.Tensor  # (B, K), higher is a better match
    num_experts: int

    @property
    def load(self) -> torch.Tensor:
        """Prompts per expert, (K,) long."""
        return torch.bincount(self.expert_ids, minlength=self.num_experts)


class Router(Component, nn.Module, abc.ABC):
    """Maps prompt embeddings z (B, D) to one of K experts."""

    @property
    @abc.abstractmethod
    def num_experts(self) -> int:
        """K."""

    def fit(self, embeddings: torch.Tensor, **context: Any) -> None:  # noqa: B027 - optional
        """Fit on a set of prompt embeddings (N, D) before routing (k-means, nearest). Default: no-op."""

    @abc.abstractmethod
    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Match of each prompt to each expert, (B, K); higher is better."""

    def route(self, z: torch.Tensor, balancer: Balancer | None = None) -> RoutingResult:
        """Argmax of the scores, or of the balancer's plan when one is given (training)."""
        s = self.scores(z)  # (B, K)
        ids = balancer.assign(s) if balancer is not None else s.argmax(dim=-1)
        return RoutingResult(ids, s, self.num_experts)


class LearnedRouter(Router):
    """A router that learns the experts' architectures (APTP's ``ot``): an architecture predictor
    (prompt z (B, D) -> gates over the U units) and K architecture codes (expert -> gates).

    APTP's phase 1 trains both (the contrastive loss compares :meth:`normalised_gates`; the resource
    and denoising losses gate the model with :meth:`predicted_gates` / :meth:`code_gates`); the codes'
    hard gates are the experts' architectures (:meth:`architectures`) that phase 2 cuts. A router
    that only assigns prompts (``kmeans``, ``nearest``, ``single``) is a plain :class:`Router`; APTP
    then trains codes of its own. A fresh learned router is unbound: :meth:`bind` gives it its unit
    space (and :meth:`load_state_tensors` of saved tensors binds it too).
    """

    #: The unit space it is bound to (None until :meth:`bind`).
    unit_space: UnitSpace | None

    @property
    @abc.abstractmethod
    def bound(self) -> bool:
        """Whether :meth:`bind` (or loading saved tensors) gave it a unit space."""

    @abc.abstractmethod
    def bind(self, unit_space: UnitSpace, embed_dim: int) -> LearnedRouter:
        """Create the predictor (D -> U units) and the K codes for ``unit_space``; returns self."""

    @abc.abstractmethod
    def predicted_gates(self, z: torch.Tensor, noise: bool = False, hard: bool = True) -> torch.Tensor:
        """Gates (B, U) of the architectures predicted for prompts z (B, D) (straight-through when hard)."""

    @abc.abstractmethod
    def code_gates(self, noise: bool = False, hard: bool = True) -> torch.Tensor:
        """Gates (K, U) of the K codes (straight-through when hard)."""

    @abc.abstractmethod
    def normalised_gates(self, z: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """Predicted architectures as routing compares them, (B, U): the vector of APTP's contrastive loss."""

    @abc.abstractmethod
    def architectures(self) -> torch.Tensor:
        """The experts' architectures: the codes' deterministic hard gates, (K, U) in {0, 1}."""

    @abc.abstractmethod
    def init_codes_from_predictions(self, z: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Set the K codes to the k-means centres of the predictions for prompts z (N, D); returns
        each prompt's cluster, (N,)."""

    @abc.abstractmethod
    def init_codes_from_groups(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Set code k to the mean prediction of the prompts z (N, D) with ``labels`` (N,) == k."""


# ---------------------------------------------------------------------------- assignment / prune
@runtime_checkable
class TrainingView(Protocol):
    """What data-driven assignments (``taylor``, ``depgraph``) read from a pruner's training context
    (:class:`aptp.pruners.training.TrainContext` implements it): the frozen dense model with gates
    installed, its training data and seeded batches."""

    backbone: Backbone  # calls the denoiser: backbone.denoise(denoiser, x_t, t, text)
    denoiser: nn.Module  # the dense denoiser, gates installed
    unit_space: UnitSpace
    granularities: Sequence[Granularity]  # the granularities that made unit_space
    gates: Any  # gates.set(g) with g (b, U) on every unit group; gates.clear() runs ungated
    features: Any  # features.take() -> the block outputs recorded since the last take
    dataset: Any  # len(dataset) training rows
    seed: int
    state: Any  # the accelerate state; state.device is this process's device

    def batch(self, global_indices: torch.Tensor, step: int, subset: torch.Tensor | None = None) -> Any:
        """This process's rows of a seeded global batch: x_t, t, text, target, snr_weight (b, ...)."""

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, timestep, text) of batch 1 for tracing the denoiser."""


@dataclass
class AssignmentContext:
    """What an assignment may look at to choose each expert's architecture. A pruner fills what it
    has; an assignment that needs a field it finds empty says so (``ConfigError``)."""

    unit_space: UnitSpace
    num_experts: int  # K
    target_ratio: float  # kept-MACs budget as a fraction of the whole model's MACs
    denoiser: nn.Module | None = None  # the dense denoiser (weights to score)
    router: Router | None = None
    granularities: Sequence[Granularity] = ()  # the granularities that made unit_space (one per kind)
    expert_ids: torch.Tensor | None = None  # (N,) the expert each training row is routed to
    # the dense model with gates installed and its training data, for data-driven criteria (taylor,
    # depgraph); None outside a pruner
    train_context: TrainingView | None = None


class Assignment(Component, abc.ABC):
    """Chooses which of the U units each of the K experts keeps."""

    @abc.abstractmethod
    def architectures(self, context: AssignmentContext) -> torch.Tensor:
        """Architecture matrix (K, U) with entries in {0, 1}."""


class Pruner(Component, abc.ABC):
    """A pruning procedure: turns a composition into K experts (and a router) on disk."""

    @abc.abstractmethod
    def run(self, composition: Composition, output_dir: Path) -> dict[str, Any]:
        """Run the procedure; write its artefacts under ``output_dir``; return a summary."""


class Metric(Component, abc.ABC):
    """A quality metric over generated images (N, 3, H, W) in [0, 1] and their prompts."""

    higher_is_better: ClassVar[bool] = True

    @abc.abstractmethod
    def compute(self, images: torch.Tensor, prompts: Sequence[str],
                reference: torch.Tensor | None = None) -> float:
        """One number for the whole set."""

    def per_sample(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float] | None:
        """One value per image whose mean is the set's value (e.g. accuracy), for paired intervals
        over prompts; None (the default) for set-level metrics such as FID or MMD."""
        return None
