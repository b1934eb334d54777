"""Static magnitude (weight-norm) pruning: the paper's baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aptp.core.errors import ConfigError
from aptp.core.interfaces import Assignment, AssignmentContext
from aptp.pruners.assignments.budget import select_at_budget


@dataclass
class MagnitudeConfig:
    min_units: int = 1  # units every width group keeps

    def __post_init__(self) -> None:
        if self.min_units < 0:
            raise ValueError(f"min_units={self.min_units} must be >= 0.")


def magnitude_importance(context: AssignmentContext) -> torch.Tensor:
    """(U,) L2 weight norm per unit; +inf for units whose granularity has no magnitude (kept)."""
    if context.denoiser is None or not context.granularities:
        raise ConfigError("magnitude importance needs the dense denoiser and its granularities in the context "
                          "(AssignmentContext(denoiser=..., granularities=...)).")
    by_kind = {g.kind: g for g in context.granularities}
    space = context.unit_space
    scores = torch.full((space.size,), float("inf"), dtype=torch.float64)
    for i, group in enumerate(space.groups):
        try:
            scores[space.group_slice(i)] = by_kind[group.kind].unit_magnitude(context.denoiser, group).double()
        except NotImplementedError:
            pass
    return scores


class MagnitudeAssignment(Assignment):
    """Every expert keeps the units of largest weight norm, at the target kept-MACs ratio."""

    config_class = MagnitudeConfig

    def architectures(self, context: AssignmentContext) -> torch.Tensor:
        arch = select_at_budget(context.unit_space, magnitude_importance(context), context.target_ratio,
                                self.config.min_units)
        return arch.expand(context.num_experts, -1).clone()  # (K, U): the same for every expert
