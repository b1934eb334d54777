"""First-order Taylor importance through the gates: |sum_b g_u dL/dg_u| at g = 1.

Generic over granularities: the gates sit where the cuts act, so the gradient of the denoising
loss with respect to a unit's gate is the first-order change of the loss when the unit is cut.
With a router of K > 1 (e.g. ``kmeans``), each expert's importance is measured on its own
prompts: routing without learned codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aptp.core.errors import ConfigError
from aptp.core.interfaces import Assignment, AssignmentContext
from aptp.pruners import objectives as O
from aptp.pruners.assignments.budget import select_at_budget


@dataclass
class TaylorConfig:
    calibration_batches: int = 4
    batch_size: int = 32
    min_units: int = 1
    per_expert: bool = True  # each expert on its own routed prompts (False: all prompts)

    def __post_init__(self) -> None:
        if self.calibration_batches < 1 or self.batch_size < 1:
            raise ValueError("calibration_batches and batch_size must be >= 1.")


def taylor_importance(ctx, members: torch.Tensor, batches: int, batch_size: int, salt: int) -> torch.Tensor:
    """(U,) Taylor importance of every unit on dataset rows ``members``."""
    from aptp.pruners import distributed as D

    space = ctx.unit_space
    total = torch.zeros(space.size, dtype=torch.float64)
    for step in range(batches):
        idx = D.global_batch_indices(len(members), batch_size, ctx.seed + salt, step)
        batch = ctx.batch(idx, 2_000_000 + 1000 * salt + step, subset=members)
        g = torch.ones(batch.z.shape[0], space.size, requires_grad=True)  # (b, U)
        ctx.gates.set(g)
        pred = ctx.backbone.denoise(ctx.denoiser, batch.x_t, batch.t, batch.text)
        ctx.gates.clear()
        ctx.features.take()  # block features are not needed here
        loss = (O.per_sample_mse(pred, batch.target) * batch.snr_weight).sum()
        (grad,) = torch.autograd.grad(loss, g)
        total += grad.sum(0).double()  # sum_b g * dL/dg at g = 1
    return D.all_reduce_sum(total.to(ctx.state.device)).cpu().abs()  # every process picks the same units


class TaylorAssignment(Assignment):
    """Keeps the units whose removal would raise the denoising loss most (first-order Taylor)."""

    config_class = TaylorConfig

    def architectures(self, context: AssignmentContext) -> torch.Tensor:
        ctx = context.train_context
        if ctx is None:
            raise ConfigError("taylor importance needs training data: run it through a pruner (e.g. pruner=static).")
        c = self.config
        ids = context.expert_ids  # (N,) or None
        archs = []
        for k in range(context.num_experts):
            members = torch.arange(len(ctx.dataset))
            if c.per_expert and ids is not None and bool((ids == k).any()):
                members = (ids == k).nonzero().flatten()
            importance = taylor_importance(ctx, members, c.calibration_batches, c.batch_size, salt=k)
            archs.append(select_at_budget(context.unit_space, importance, context.target_ratio, c.min_units))
            if not c.per_expert:
                return archs[0].expand(context.num_experts, -1).clone()
        return torch.stack(archs)  # (K, U)
