"""torch-pruning's importance criteria over aptp's units (assignment ``depgraph``).

For each width unit group, torch-pruning's dependency graph gathers every parameter slice coupled
to the group's channels (a ResNet's conv1 rows, norm2, time_emb_proj rows and conv2 columns; a
head's q/k/v rows and to_out columns; both GEGLU halves and ``net[2]``'s columns of an FFN group);
a torch-pruning importance scores each channel over that whole group (per-layer scores reduced by
``group_reduction``, normalised by ``normalizer``), and a unit scores the sum of its channels.
The units then go through the same budget selection as every assignment
(:func:`~aptp.pruners.assignments.budget.select_at_budget`), so only the criterion differs.

``importance``:

* ``magnitude``: ``GroupMagnitudeImportance``, the L_p norm of the coupled weights;
* ``taylor``: ``GroupTaylorImportance``, ``|w * dL/dw|`` with the denoising loss of calibration
  batches (weight-level first order, as in Diff-Pruning; ``assignment: taylor`` is gate-level,
  ``|sum_u g dL/dg|`` per unit); with a router of K > 1 each expert is scored on its own prompts;
* ``lamp``: ``LAMPImportance``, layer-adaptive magnitude (its own normaliser; ``normalizer`` is unused);
* ``fpgm``: ``FPGMImportance``, distance to the geometric median.

Units without channels (depth) are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from aptp.core.errors import ConfigError
from aptp.core.interfaces import Assignment, AssignmentContext, Granularity
from aptp.core.units import UnitSpace
from aptp.pruners import objectives as O
from aptp.pruners.assignments.budget import select_at_budget

IMPORTANCES = ("magnitude", "taylor", "lamp", "fpgm")
NORMALIZERS = ("mean", "max", "sum", "standarization", "gaussian", None)


@dataclass
class DepGraphImportanceConfig:
    importance: str = "taylor"  # one of IMPORTANCES
    p: int = 2  # norm of magnitude / lamp / fpgm
    group_reduction: str = "mean"  # how the coupled layers' scores combine: mean | sum | max | prod | first
    normalizer: str | None = "mean"  # torch-pruning's per-group normalisation (None: raw scores)
    min_units: int = 1
    calibration_batches: int = 4  # taylor only
    batch_size: int = 32  # taylor only
    per_expert: bool = True  # taylor with K > 1: each expert on its own routed prompts

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance={self.importance!r} is unknown; use one of {list(IMPORTANCES)}.")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer={self.normalizer!r} is unknown; use one of {list(NORMALIZERS)}.")
        if self.group_reduction not in ("mean", "sum", "max", "prod", "first"):
            raise ValueError(f"group_reduction={self.group_reduction!r} is unknown; use mean, sum, max, prod or first.")
        if self.calibration_batches < 1 or self.batch_size < 1 or self.p < 1:
            raise ValueError("calibration_batches, batch_size and p must be >= 1.")


def _criterion(c: DepGraphImportanceConfig):
    import torch_pruning as tp

    imp = tp.importance
    if c.importance == "magnitude":
        return imp.GroupMagnitudeImportance(p=c.p, group_reduction=c.group_reduction, normalizer=c.normalizer)
    if c.importance == "taylor":
        return imp.GroupTaylorImportance(group_reduction=c.group_reduction, normalizer=c.normalizer)
    if c.importance == "lamp":
        return imp.LAMPImportance(p=c.p, group_reduction=c.group_reduction)  # LAMP is its own normaliser
    return imp.FPGMImportance(p=c.p, group_reduction=c.group_reduction, normalizer=c.normalizer)


def unit_scores(space: UnitSpace, granularities: Sequence[Granularity], denoiser: nn.Module, graph,
                criterion) -> torch.Tensor:
    """(U,) torch-pruning ``criterion`` of every unit of ``space`` over ``graph`` (the dependency
    graph of ``denoiser``); +inf where a group has no channels (kept by the budget selection)."""
    from aptp.pruners.torch_pruning_cut import unit_group_dependencies

    kinds = {g.kind: g for g in granularities}
    scores = torch.full((space.size,), float("inf"), dtype=torch.float64)
    for i, grp in enumerate(space.groups):
        if grp.is_depth:
            continue  # depth: blocks, not channels
        try:
            group = unit_group_dependencies(graph, kinds[grp.kind], denoiser, grp)
        except NotImplementedError:
            continue  # a granularity that is not channels
        channel = criterion(group)  # (C,) one score per input channel of the consumer layer
        if channel is None:
            raise ConfigError(f"torch-pruning found no weights to score in {grp.path!r} ({grp.kind}).")
        scores[space.group_slice(i)] = channel.detach().double().cpu().view(grp.num_units, -1).sum(1)
    return scores


def _accumulate_gradients(ctx, members: torch.Tensor, batches: int, batch_size: int, salt: int) -> None:
    """dL/dw of the denoising loss on ``batches`` calibration batches of dataset rows ``members``,
    summed into the dense model's ``.grad`` (all processes together)."""
    from aptp.pruners import distributed as D

    model = ctx.denoiser
    model.zero_grad(set_to_none=True)
    ctx.gates.clear()
    for step in range(batches):
        idx = D.global_batch_indices(len(members), batch_size, ctx.seed + salt, step)
        batch = ctx.batch(idx, 3_000_000 + 1000 * salt + step, subset=members)
        pred = ctx.backbone.denoise(model, batch.x_t, batch.t, batch.text)
        ctx.features.take()  # block features are not needed here
        (O.per_sample_mse(pred, batch.target) * batch.snr_weight).sum().backward()
    D.sum_gradients(model.parameters())


class DepGraphImportanceAssignment(Assignment):
    """Keeps the units torch-pruning's importance ranks highest, at the target kept-MACs ratio."""

    config_class = DepGraphImportanceConfig

    def architectures(self, context: AssignmentContext) -> torch.Tensor:
        from aptp.pruners.torch_pruning_cut import dependency_graph

        ctx = context.train_context
        if ctx is None:
            raise ConfigError("depgraph importance needs the dense model and its data: run it through a pruner "
                              "(e.g. pruner=static).")
        c = self.config
        model = ctx.denoiser
        graph = dependency_graph(model, ctx.example_inputs(), lambda m, a: ctx.backbone.denoise(m, *a))
        criterion = _criterion(c)

        def select() -> torch.Tensor:  # (U,)
            scores = unit_scores(ctx.unit_space, ctx.granularities, model, graph, criterion)
            return select_at_budget(ctx.unit_space, scores, context.target_ratio, c.min_units)

        if c.importance != "taylor":
            arch = select()
            return arch.expand(context.num_experts, -1).clone()  # (K, U)
        ids = context.expert_ids  # (N,) or None
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        model.requires_grad_(True)
        archs = []
        try:
            for k in range(context.num_experts if c.per_expert else 1):
                members = torch.arange(len(ctx.dataset))
                if c.per_expert and ids is not None and bool((ids == k).any()):
                    members = (ids == k).nonzero().flatten()
                _accumulate_gradients(ctx, members, c.calibration_batches, c.batch_size, salt=k)
                archs.append(select())
        finally:
            model.zero_grad(set_to_none=True)
            for n, p in model.named_parameters():
                p.requires_grad_(n not in frozen)
        if not c.per_expert:
            return archs[0].expand(context.num_experts, -1).clone()
        return torch.stack(archs)  # (K, U)
