"""The single-expert router (K = 1): every prompt goes to expert 0 (all static baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aptp.core.interfaces import Router
from aptp.routers._checks import check_embeddings


@dataclass
class SingleRouterConfig:
    """No parameters: K = 1."""


class SingleRouter(Router):
    """K = 1: every prompt to expert 0 (static pruning baselines)."""

    config_class = SingleRouterConfig

    @property
    def num_experts(self) -> int:
        return 1

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        z = check_embeddings(z)
        return torch.zeros(z.shape[0], 1, dtype=torch.float32, device=z.device)  # (B, 1)
