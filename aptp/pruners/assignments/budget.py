"""Choosing units at a MACs budget from per-unit importance scores."""

from __future__ import annotations

import torch

from aptp.core.units import UnitSpace


def normalise_per_group(space: UnitSpace, importance: torch.Tensor) -> torch.Tensor:
    """Divide each group's scores by the group's mean, so groups of different scale compare, (U,)."""
    out = importance.clone().double()
    for i in range(len(space.groups)):
        sl = space.group_slice(i)
        mean = out[sl].abs().mean()
        out[sl] = out[sl] / mean if mean > 0 else out[sl]
    return out


def select_at_budget(space: UnitSpace, importance: torch.Tensor, ratio: float, min_units: int = 1) -> torch.Tensor:
    """The architecture (U,) in {0, 1} that drops the least important units (importance per MAC,
    normalised per group) until the kept-MACs ratio is at most ``ratio``.

    Units with infinite importance are never dropped; every width group keeps at least
    ``min_units`` units. If the budget cannot be met, the smallest reachable architecture is
    returned (its ratio is above ``ratio``).
    """
    space.check(importance, "importance")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must be in (0, 1].")
    macs = torch.tensor([m for g in space.groups for m in g.macs_of_units()], dtype=torch.float64)
    score = normalise_per_group(space, importance.nan_to_num(posinf=float("inf"))) / macs.clamp_min(1.0)
    protected = torch.isinf(importance)
    for i, g in enumerate(space.groups):  # keep the min_units best units of each width group
        if not g.is_depth:
            sl = space.group_slice(i)
            best = score[sl].argsort(descending=True)[: min(min_units, g.num_units)]
            protected[sl.start + best] = True
    order = [int(u) for u in score.argsort() if not protected[u]]  # least important first

    def arch_without(m: int) -> torch.Tensor:
        a = torch.ones(space.size)
        a[order[:m]] = 0.0
        return a

    lo, hi = 0, len(order)
    if float(space.macs_ratio(arch_without(0))) <= ratio:
        return arch_without(0)
    while lo < hi:  # smallest m whose ratio is within budget; MACs fall monotonically with m
        mid = (lo + hi) // 2
        if float(space.macs_ratio(arch_without(mid))) <= ratio:
            hi = mid
        else:
            lo = mid + 1
    return arch_without(lo)
