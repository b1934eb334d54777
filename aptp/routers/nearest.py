"""Nearest-neighbour router (ablation): route a prompt to the expert of its most similar labelled
prompt.

``fit(embeddings, labels=...)`` stores a bank of N labelled embeddings (labels in [0, K)); without
labels (a pruner fitting it to its training prompts) the bank is labelled by k-means clusters
(``unlabelled: kmeans``), so a prompt goes to the cluster of its nearest training prompt;
``scores(z)[b, k]`` = the highest cosine similarity between z_b and a bank prompt of expert k
(``EMPTY_SCORE`` = -2, below any cosine, for an expert without bank prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import Router
from aptp.routers._checks import check_embeddings

EMPTY_SCORE = -2.0
CHUNK = 1024  # prompts per similarity block, bounds memory at CHUNK x N


@dataclass
class NearestRouterConfig:
    """Nearest neighbour to a bank of labelled prompts."""

    num_experts: int = 8  # K; bank labels must lie in [0, K)
    # labels of a bank fitted without labels: "kmeans" (k-means clusters of the bank, seeded) or
    # "none" (labels are required)
    unlabelled: str = "kmeans"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
        if self.unlabelled not in ("kmeans", "none"):
            raise ValueError(f"unlabelled={self.unlabelled!r} must be 'kmeans' or 'none'.")


class NearestRouter(Router):
    """Nearest neighbour (cosine) to a bank of labelled prompts (ablation)."""

    config_class = NearestRouterConfig

    def __init__(self, config: NearestRouterConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("bank", torch.empty(0, 0))  # (N, D) unit-normalised
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))  # (N,)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def fitted(self) -> bool:
        return self.bank.numel() > 0

    def fit(self, embeddings: torch.Tensor, labels: Any = None, **context: Any) -> None:
        """Store ``embeddings`` (N, D) with their expert ``labels`` (N,) ints in [0, K)."""
        z = check_embeddings(embeddings)
        if labels is None and self.config.unlabelled == "kmeans":  # 1-NN over k-means-labelled prompts
            from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig

            if z.shape[0] < self.num_experts:
                raise ConfigError(f"need at least num_experts={self.num_experts} prompts to label the bank, "
                                  f"got {z.shape[0]}.")
            clusters = KMeansRouter(KMeansRouterConfig(num_experts=self.num_experts, seed=self.config.seed))
            clusters.fit(z)
            labels = clusters.route(z).expert_ids  # (N,)
        if labels is None:
            raise ConfigError("the 'nearest' router needs labels: fit(embeddings, labels=expert_id_per_prompt), "
                              "or unlabelled: kmeans.")
        labels = torch.as_tensor(labels)
        if labels.shape != (z.shape[0],) or labels.is_floating_point():
            raise ShapeError(
                f"labels must be N={z.shape[0]} integer expert ids, shape ({z.shape[0]},), "
                f"got {tuple(labels.shape)} {labels.dtype}."
            )
        K = self.num_experts
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise ConfigError(
                f"labels must lie in [0, {K}), got values in [{int(labels.min())}, {int(labels.max())}]; "
                f"set num_experts={int(labels.max()) + 1} or fix the labels."
            )
        self.bank = F.normalize(z.detach().to(torch.float32), dim=-1).clone()
        self.labels = labels.to(torch.long).clone()

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise ConfigError("the 'nearest' router has no bank: call router.fit(embeddings, labels=...) first.")
        z = F.normalize(check_embeddings(z, self.bank.shape[1]).to(self.bank), dim=-1)  # (B, D)
        out = []
        for block in torch.split(z, CHUNK):
            sim = block @ self.bank.T  # (b, N)
            s = torch.full((block.shape[0], self.num_experts), EMPTY_SCORE, dtype=sim.dtype, device=sim.device)
            out.append(s.scatter_reduce(1, self.labels.expand_as(sim), sim, reduce="amax"))  # (b, K)
        return torch.cat(out)  # (B, K)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"bank", "labels"}:
            raise ShapeError(f"a saved 'nearest' router holds 'bank' and 'labels', got {sorted(tensors)}.")
        bank, labels = tensors["bank"], tensors["labels"]
        if labels.shape != bank.shape[:1]:
            raise ShapeError(f"bank {tuple(bank.shape)} and labels {tuple(labels.shape)} do not match.")
        if labels.numel() and int(labels.max()) >= self.num_experts:
            raise ShapeError(
                f"the saved bank has labels up to {int(labels.max())}, this router num_experts="
                f"{self.num_experts}; set num_experts={int(labels.max()) + 1}."
            )
        self.bank = bank.to(torch.float32).clone()
        self.labels = labels.to(torch.long).clone()
