"""torch-pruning as a second, independent cutting backend for channel architectures.

:func:`cut_with_torch_pruning` cuts the same architecture (U,) as
:func:`aptp.pruners.gating.cut_model`, but it is torch-pruning's dependency graph (DepGraph, Fang
et al., CVPR 2023) that finds every parameter coupled to a dropped unit::

    unit group --Granularity.unit_channels--> (consumer layer, s channels per unit)
    dropped units' input channels of that layer --DependencyGraph--> every coupled slice
        e.g. ResNet: conv2 in  <- SiLU <- norm2 <- (+ time_emb_proj rows) <- conv1 out
             heads:  to_out[0] in <- SDPA <- to_q / to_k / to_v rows
             GEGLU:  net[2] in <- mul <- split <- proj rows (both halves)

torch-pruning slices tensors but knows nothing of diffusers' bookkeeping, so afterwards every
``GroupNorm`` gets back its channels per group (torch-pruning keeps the group *count*) and every
``Attention`` its head count and inner widths. The result must hold exactly the unit space's
``kept_params(arch)`` parameters, or the cut is refused: the two backends are checked against
each other on every call, and tests/pruners/test_depgraph.py checks they compute the same function.

Limits (each a :class:`~aptp.core.errors.ConfigError`): channel units only (a dropped depth unit
is a block removal, not a channel cut), and every unit group keeps at least one unit
(torch-pruning does not remove a layer's last channel; ``min_units >= 1`` in the assignments).
Use ``cut_backend: aptp`` for those.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from aptp.core.errors import ConfigError, IncompatibleError, ShapeError
from aptp.core.interfaces import Granularity
from aptp.core.resources import count_params
from aptp.core.units import UnitGroup, UnitSpace
from aptp.pruners.granularities.toolkit import channel_index

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]


def _default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def cut_with_torch_pruning(denoiser: nn.Module, space: UnitSpace, granularities: Sequence[Granularity],
                           arch: torch.Tensor, example_inputs: Any, forward_fn: ForwardFn | None = None,
                           inplace: bool = False) -> nn.Module:
    """A physically smaller copy of ``denoiser`` keeping the units where ``arch`` (U,) >= 0.5, cut by
    torch-pruning's dependency graph.

    ``example_inputs`` is what ``forward_fn(model, example_inputs)`` needs for one traced forward
    (e.g. ``(x (1, C, H, W), t (1,), text (1, L, D))`` with ``forward_fn = lambda m, a:
    backbone.denoise(m, *a)``); without ``forward_fn`` the model is called on them and
    ``.sample`` taken.
    """
    from aptp.pruners.gating import _by_kind, strip_gate_hooks

    if arch.dim() != 1:
        raise ShapeError(f"cut_with_torch_pruning takes one architecture of shape ({space.size},), "
                         f"got {tuple(arch.shape)}; cut each expert separately.")
    space.check(arch)
    keep = space.normalise(arch.detach().cpu().float()) >= 0.5  # (U,) bool; below a group's min_kept: none
    kinds = _by_kind(granularities)
    cuts = []  # (group, dropped units (n,) bool)
    for i, grp in enumerate(space.groups):
        k = keep[space.group_slice(i)]
        if bool(k.all()):
            continue
        if grp.is_depth:
            raise ConfigError(f"the torch-pruning backend cuts channels only, but the architecture drops "
                              f"{int((~k).sum())} {grp.kind} unit(s) (blocks of {grp.path!r}); "
                              "use cut_backend: aptp for depth pruning.")
        if not bool(k.any()):
            raise ConfigError(f"the architecture drops every unit of {grp.kind} group {grp.path!r}; torch-pruning "
                              "cannot remove a layer's last channel. Keep min_units >= 1 or use cut_backend: aptp.")
        if grp.kind not in kinds:
            raise ConfigError(f"no granularity '{grp.kind}' given to cut unit group {grp.path!r}; given: {sorted(kinds)}.")
        cuts.append((grp, ~k))

    model = denoiser if inplace else copy.deepcopy(denoiser)
    strip_gate_hooks(model)
    if not cuts:
        return model
    norms = {m: m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    heads = {m: m.to_q.out_features // m.heads for m in model.modules() if _is_attention(m)}

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    graph = dependency_graph(model, example_inputs, forward_fn)
    for grp, drop in cuts:
        group = unit_group_dependencies(graph, kinds[grp.kind], model, grp, units=drop)
        if not graph.check_pruning_group(group):
            raise IncompatibleError(f"torch-pruning refuses to cut {int(drop.sum())} units of {grp.path!r}; "
                                    "it would empty a coupled layer.")
        group.prune()
    for n, p in model.named_parameters():  # pruned layers hold new Parameter objects
        p.requires_grad_(n not in frozen)

    for norm, per_group in norms.items():  # torch-pruning keeps num_groups; the unit keeps channels per group
        if norm.num_channels % per_group:
            raise IncompatibleError(f"a GroupNorm lost {norm.num_channels % per_group} channels of a group; "
                                    "the cut split a group, which changes its statistics.")
        norm.num_groups = norm.num_channels // per_group
    for attn, d in heads.items():
        attn.heads = attn.to_q.out_features // d
        attn.inner_dim = attn.to_q.out_features
        attn.inner_kv_dim = attn.to_k.out_features

    want, got = round(float(space.kept_params(keep.float()))), count_params(model)
    if got != want:
        raise IncompatibleError(f"torch-pruning left {got:,} parameters but the unit space keeps {want:,} for this "
                                "architecture: its dependency graph coupled channels the granularities do not own. "
                                "Use cut_backend: aptp for this model.")
    return model


def dependency_graph(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None):
    """torch-pruning's ``DependencyGraph`` of ``model``, traced with one forward in eval mode.

    The trace follows autograd, so frozen parameters are unfrozen for it (and frozen again after)."""
    import torch_pruning as tp

    was_training = model.training
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.eval().requires_grad_(True)  # frozen weights would leave no trace
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                          forward_fn=forward_fn or _default_forward, verbose=False)
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
    return graph


def unit_group_dependencies(graph, granularity: Granularity, model: nn.Module, group: UnitGroup,
                            units: torch.Tensor | None = None):
    """torch-pruning's pruning group of the channels of ``units`` ((n,) bool; default: every unit)
    of ``group``: the consumer layer's input channels (:meth:`Granularity.unit_channels`) and every
    slice coupled to them."""
    layer, s = granularity.unit_channels(model, group)
    units = torch.ones(group.num_units, dtype=torch.bool) if units is None else units
    pruner = graph.get_pruner_of_module(layer)
    return graph.get_pruning_group(layer, pruner.prune_in_channels, idxs=channel_index(units, s).tolist())


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)
