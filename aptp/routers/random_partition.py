"""Random-partition router (control): the distinct training prompts are split into K groups of equal
size at random (seeded), and a prompt is routed to the group of its nearest training prompt.
Repeated prompts (identical embeddings) belong to one group: a prompt has one expert.

The control for any routing claim: experts specialised on groups that share nothing but their size.
``fit(embeddings)`` draws the partition; routing is nearest neighbour (cosine) to the labelled bank,
as the ``nearest`` router does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aptp.routers._checks import check_embeddings, check_enough_prompts
from aptp.routers.nearest import NearestRouter


@dataclass
class RandomPartitionRouterConfig:
    """K groups of equal size (differing by at most one prompt), drawn with ``seed``."""

    num_experts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1.")


class RandomPartitionRouter(NearestRouter):
    """A seeded random partition of the training prompts into K equal groups; nearest neighbour at inference."""

    config_class = RandomPartitionRouterConfig

    def fit(self, embeddings: torch.Tensor, labels: Any = None, **context: Any) -> None:
        z = check_embeddings(embeddings)
        if labels is not None:
            return super().fit(z, labels=labels)
        check_enough_prompts(self.num_experts, z)  # an empty group would be an expert without prompts
        distinct = torch.unique(z.detach().to(torch.float32), dim=0)  # (M, D): one row per distinct prompt
        m = distinct.shape[0]
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(self.config.seed))  # (M,)
        groups = torch.empty(m, dtype=torch.long)
        groups[perm] = torch.arange(m) % self.num_experts  # equal group sizes over distinct prompts
        super().fit(distinct, labels=groups)
