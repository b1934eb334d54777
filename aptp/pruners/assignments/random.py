"""Random architecture at the budget: the floor any criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aptp.core.interfaces import Assignment, AssignmentContext
from aptp.pruners.assignments.budget import select_at_budget


@dataclass
class RandomConfig:
    seed: int = 0
    min_units: int = 1
    per_expert: bool = False  # a different random architecture per expert


class RandomAssignment(Assignment):
    """Drops random units (seeded) until the target kept-MACs ratio is met."""

    config_class = RandomConfig

    def architectures(self, context: AssignmentContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed)
        k = context.num_experts if self.config.per_expert else 1
        archs = []
        for _ in range(k):
            importance = torch.rand(context.unit_space.size, generator=g, dtype=torch.float64)
            # select_at_budget divides by MACs: multiply back so the draw is uniform per unit
            macs = torch.tensor([m for grp in context.unit_space.groups for m in grp.macs_of_units()],
                                dtype=torch.float64).clamp_min(1.0)
            archs.append(select_at_budget(context.unit_space, importance * macs, context.target_ratio,
                                          self.config.min_units))
        out = torch.stack(archs)
        return out if self.config.per_expert else out.expand(context.num_experts, -1).clone()
