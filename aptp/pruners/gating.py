"""The core-facing API of the granularities: unit space, gates and physical cuts of a denoiser.

::

    space = build_unit_space(unet, granularities, backbone.conditioning())   # U units, MACs model
    with Gates(unet, space, granularities) as gates:
        gates.set(g)            # g (B, U) soft or hard gates, one row per sample (or (U,) for all)
        y = unet(x, t, text)    # gated forward
        gates.set(None)         # the SAME weights, ungated: the dense teacher
    expert = cut_model(unet, space, granularities, arch)   # arch (U,) -> a smaller UNet2DConditionModel
    space.kept_macs(arch)       # analytic MACs of that expert (FlopCounterMode agrees within 0.5 %)

A hard-gated forward and the cut expert compute the same function (tests/pruners/test_exactness.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import Conditioning, Granularity
from aptp.core.resources import count_params
from aptp.core.units import UnitGroup, UnitSpace
from aptp.pruners.granularities.toolkit import trace

_GATE_MARK = "_aptp_gate"


def kind_of(granularity: Granularity) -> str:
    kind = getattr(granularity, "kind", None)
    if not isinstance(kind, str):
        raise ConfigError(f"granularity {type(granularity).__name__} must define a class attribute `kind` (its registered name).")
    return kind


def _by_kind(granularities: Sequence[Granularity]) -> dict[str, Granularity]:
    out: dict[str, Granularity] = {}
    for g in granularities:
        k = kind_of(g)
        if k in out:
            raise ConfigError(f"granularity '{k}' is listed twice; list each granularity once.")
        out[k] = g
    return out


def build_unit_space(denoiser: nn.Module, granularities: Sequence[Granularity],
                     conditioning: Conditioning) -> UnitSpace:
    """The union of the granularities' unit groups, ordered by :attr:`Granularity.order` (then as
    given), with the dense model's totals.

    Width groups whose module lies inside a depth unit get ``parent=`` that unit's path, and the
    depth unit's MACs / parameters exclude those nested groups (so nothing is counted twice).
    ``total_macs`` is the analytic per-sample MACs of the whole denoiser at ``conditioning``.
    """
    kinds = _by_kind(granularities)
    order = sorted(kinds, key=lambda k: (kinds[k].order, list(kinds).index(k)))  # Granularity.order, then as given
    groups: list[UnitGroup] = [grp for k in order for grp in kinds[k].unit_groups(denoiser, conditioning)]

    owners = [p for grp in groups for p in grp.unit_paths]  # depth units (blocks)

    def owner(path: str) -> str | None:
        return next((p for p in owners if path == p or path.startswith(p + ".")), None)

    nested_macs: dict[str, float] = {}
    nested_params: dict[str, int] = {}
    out: list[UnitGroup] = []
    for grp in groups:
        if not grp.is_depth:
            parent = owner(grp.path)
            if parent is not None:
                grp = dataclasses.replace(grp, parent=parent)
                nested_macs[parent] = nested_macs.get(parent, 0.0) + grp.macs_per_unit * grp.num_units
                nested_params[parent] = nested_params.get(parent, 0) + grp.params_per_unit * grp.num_units
        out.append(grp)
    for i, grp in enumerate(out):
        if grp.is_depth and any(p in nested_macs for p in grp.unit_paths):
            macs = tuple(m - nested_macs.get(p, 0.0) for p, m in zip(grp.unit_paths, grp.macs_of_units()))
            params = tuple(q - nested_params.get(p, 0) for p, q in zip(grp.unit_paths, grp.params_of_units()))
            out[i] = dataclasses.replace(grp, unit_macs=macs, unit_params=params,
                                         macs_per_unit=sum(macs) / len(macs), params_per_unit=sum(params) // len(params))
    tr = trace(denoiser, conditioning)
    return UnitSpace(tuple(out), float(tr.total_macs), count_params(denoiser),
                     tuple(conditioning.sample_shape), int(conditioning.text_len))


class Gates:
    """Installs the gates of a whole unit space on a denoiser; ``set`` / ``clear`` them per forward.

    ``set(g)`` with ``g`` (B, U) (per-sample gates, soft or hard) or (U,) (one architecture for the
    batch); ``set(None)`` runs the model ungated (dense). Rows tile when the denoiser's batch is a
    multiple of B (e.g. ``cat([uncond, cond])`` under classifier-free guidance); any other batch is
    a :class:`~aptp.core.errors.ShapeError`. Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, denoiser: nn.Module, space: UnitSpace, granularities: Sequence[Granularity]) -> None:
        self.space = space
        self._g: torch.Tensor | None = None
        kinds = _by_kind(granularities)
        self._handles = []
        for i, grp in enumerate(space.groups):
            if grp.kind not in kinds:
                raise ConfigError(f"unit space has groups of kind '{grp.kind}' but no such granularity was given "
                                  f"(given: {sorted(kinds)}); pass the granularities the space was built with.")
            before = _hook_ids(denoiser)
            self._handles.append(kinds[grp.kind].attach(denoiser, grp, self._getter(i)))
            _mark_new_hooks(denoiser, before)

    def _getter(self, index: int):
        sl = self.space.group_slice(index)

        def get() -> torch.Tensor | None:
            return None if self._g is None else self._g[:, sl]  # (B, n_g)

        return get

    def set(self, gates: torch.Tensor | None) -> None:
        """Gates (B, U) or (U,) for the next forwards; ``None`` = ungated."""
        if gates is None:
            self._g = None
            return
        if gates.dim() not in (1, 2):
            raise ShapeError(f"gates must have shape (B, {self.space.size}) or ({self.space.size},), got {tuple(gates.shape)}.")
        self.space.check(gates, "gates")
        self._g = gates if gates.dim() == 2 else gates.unsqueeze(0)

    def clear(self) -> None:
        self.set(None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._g = None

    def __enter__(self) -> Gates:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _hook_dicts(m: nn.Module) -> list[dict]:
    return [m._forward_pre_hooks, m._forward_hooks]


def _hook_ids(root: nn.Module) -> set[tuple[int, int]]:
    return {(id(d), k) for m in root.modules() for d in _hook_dicts(m) for k in d}


def _mark_new_hooks(root: nn.Module, before: set[tuple[int, int]]) -> None:
    for m in root.modules():
        for d in _hook_dicts(m):
            for k, fn in d.items():
                if (id(d), k) not in before:
                    try:
                        setattr(fn, _GATE_MARK, True)
                    except AttributeError:
                        pass


def strip_gate_hooks(root: nn.Module) -> None:
    """Remove gate hooks that a deepcopy carried over (the cut model must never be gated)."""
    for m in root.modules():
        for d in _hook_dicts(m):
            for k in [k for k, fn in d.items() if getattr(fn, _GATE_MARK, False)]:
                del d[k]
        for attr in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            d = getattr(m, attr, None)
            if d is not None:
                for k in [k for k in d if k not in m._forward_hooks and k not in m._forward_pre_hooks]:
                    del d[k]


def hard(arch: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """0/1 float architecture from soft gates (``g >= threshold``)."""
    return (arch >= threshold).to(torch.float32)


def cut_model(denoiser: nn.Module, space: UnitSpace, granularities: Sequence[Granularity],
              arch: torch.Tensor, inplace: bool = False) -> nn.Module:
    """A physically smaller copy of ``denoiser`` keeping the units where ``arch`` (U,) >= 0.5.

    The dense weights are copied first and then sliced (never re-initialised). Width groups inside
    a dropped block are skipped (the block is replaced). Returns the same class (a diffusers
    ``UNet2DConditionModel``) with diffusers' own submodules except where a block lost every unit
    (see :mod:`aptp.pruners.granularities._modules`). ``inplace=True`` cuts ``denoiser`` itself
    (e.g. a model built on the ``meta`` device by :func:`aptp.pruners.expert.load_expert`).
    """
    if arch.dim() != 1:
        raise ShapeError(f"cut_model takes one architecture of shape ({space.size},), got {tuple(arch.shape)}; "
                         "cut each expert separately.")
    space.check(arch)
    keep = arch.detach().cpu() >= 0.5  # (U,) bool
    kinds = _by_kind(granularities)
    model = denoiser if inplace else copy.deepcopy(denoiser)
    strip_gate_hooks(model)
    where = {p: space.offsets[i] + j for i, g in enumerate(space.groups) for j, p in enumerate(g.unit_paths)}
    width = [i for i, g in enumerate(space.groups) if not g.is_depth]
    blocks = [i for i, g in enumerate(space.groups) if g.is_depth]
    for i in width + blocks:  # width first: a depth cut replaces whole blocks
        grp = space.groups[i]
        if grp.parent is not None and not bool(keep[where[grp.parent]]):
            continue
        if grp.kind not in kinds:
            raise ConfigError(f"no granularity '{grp.kind}' given to cut unit group {grp.path!r}; "
                              f"given: {sorted(kinds)}.")
        kinds[grp.kind].cut(model, grp, keep[space.group_slice(i)])
    return model


def uniform_architecture(space: UnitSpace, ratio: float, kinds: Sequence[str] | None = None,
                         min_units: int = 1) -> torch.Tensor:
    """An architecture (U,) at about ``ratio`` of the dense MACs keeping the same fraction of every
    width group (its first units); depth units stay. A simple budget helper for benchmarks.

    Returns the largest such architecture with ``macs_ratio <= ratio`` (or the smallest possible).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must be in (0, 1].")
    kinds = list(kinds) if kinds is not None else [g.kind for g in space.groups if not g.is_depth]

    def arch_at(f: float) -> torch.Tensor:
        a = torch.ones(space.size)
        for i, g in enumerate(space.groups):
            if g.kind in kinds and not g.is_depth:
                k = max(min(g.num_units, min_units), min(g.num_units, math.ceil(f * g.num_units - 1e-9)))
                sl = space.group_slice(i)
                a[sl] = 0.0
                a[sl.start:sl.start + k] = 1.0
        return a

    lo, hi = 0.0, 1.0
    if float(space.macs_ratio(arch_at(1.0))) <= ratio:
        return arch_at(1.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(space.macs_ratio(arch_at(mid))) <= ratio:
            lo = mid
        else:
            hi = mid
    return arch_at(lo)
