"""k-means router (ablation): clusters of prompt embeddings are the experts.

``fit(embeddings)`` runs scikit-learn's KMeans (fixed seed) on the (optionally unit-normalised)
embeddings; ``scores(z) = -||z - c_k||^2`` (B, K), so the argmax is the nearest centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import Router
from aptp.routers._checks import check_embeddings, check_enough_prompts


@dataclass
class KMeansRouterConfig:
    """k-means on prompt embeddings."""

    num_experts: int = 8  # K clusters
    seed: int = 0  # KMeans random_state
    n_init: int = 4  # KMeans restarts
    max_iter: int = 300
    normalize: bool = True  # cluster unit-normalised embeddings (spherical k-means in effect)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
        if self.n_init < 1 or self.max_iter < 1:
            raise ValueError(f"n_init={self.n_init} and max_iter={self.max_iter} must be >= 1.")


class KMeansRouter(Router):
    """k-means on prompt embeddings: each cluster centre is an expert (ablation)."""

    config_class = KMeansRouterConfig

    def __init__(self, config: KMeansRouterConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("centers", torch.empty(0, 0))  # (K, D) once fitted

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def fitted(self) -> bool:
        return self.centers.numel() > 0

    def _prep(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(torch.float32) if not self.fitted else z.to(self.centers)
        return F.normalize(z, dim=-1) if self.config.normalize else z

    def fit(self, embeddings: torch.Tensor, **context: Any) -> None:
        """Cluster ``embeddings`` (N, D) into K clusters; N must be >= K."""
        z = check_embeddings(embeddings)
        K, N = self.config.num_experts, z.shape[0]
        if N < K:
            raise ConfigError(
                f"k-means cannot make K={K} clusters from {N} prompts; fit on at least {K} prompts "
                f"or lower num_experts to <= {N}."
            )
        check_enough_prompts(K, z, context.get("prompts"))  # K clusters of identical prompts would be empty
        km = KMeans(n_clusters=K, random_state=self.config.seed, n_init=self.config.n_init,
                    max_iter=self.config.max_iter)
        km.fit(self._prep(z).detach().cpu().double().numpy())
        self.centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=self.centers.device)  # (K, D)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise ConfigError("the 'kmeans' router is not fitted: call router.fit(embeddings) first.")
        z = self._prep(check_embeddings(z, self.centers.shape[1]))  # (B, D)
        return -torch.cdist(z, self.centers).pow(2)  # (B, K)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        centers = tensors.get("centers")
        if centers is None or set(tensors) != {"centers"}:
            raise ShapeError(f"a saved 'kmeans' router holds exactly 'centers', got {sorted(tensors)}.")
        if centers.numel() and centers.shape[0] != self.num_experts:
            raise ShapeError(
                f"the saved k-means router has K={centers.shape[0]} centres, this one num_experts="
                f"{self.num_experts}; set num_experts={centers.shape[0]}."
            )
        self.centers = centers.to(torch.float32).clone()
