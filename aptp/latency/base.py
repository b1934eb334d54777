"""The latency model contract: measured latency of any architecture of a denoiser, differentiable.

A latency model is a component kind like the others (hook ``aptp_register_latency_models``), so a
plugin can add one for its hardware::

    model = registry["latency_model"].get("profiled").build()
    model.fit(LatencyContext(denoiser, space, granularities, conditioning, backbone.denoise))
    model.latency(arch)          # (..., U) -> (...) ms, float64, differentiable in arch
    model.latency_ratio(arch)    # the same as a fraction of the dense model's latency

``fit`` measures (or loads what was measured) on the hardware the model's config names; the
prediction is then a pure function of the architecture, so the resource loss and the static budget
search can target latency (``resource: latency``) as they target MACs.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aptp.core.interfaces import Component, Conditioning, Granularity
from aptp.core.units import UnitGroup, UnitSpace

NS = 1e6  # ns per ms: the unit of :meth:`LatencyModel.priced_space`

#: how a denoiser is called: ``call(denoiser, sample (B,C,H,W), timestep (B,), text (B,L,D))``
DenoiserCall = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass
class LatencyContext:
    """What a latency model may look at to profile a denoiser."""

    denoiser: nn.Module  # the dense denoiser (gates, if installed, must be off)
    unit_space: UnitSpace
    granularities: Sequence[Granularity]  # the ones the unit space was built with (they cut it)
    conditioning: Conditioning  # sample shape and text length: the resolution profiled
    call: DenoiserCall  # the backbone's calling convention (``Backbone.denoise``)


class LatencyModel(Component, abc.ABC):
    """Predicts the latency of a denoiser cut to any architecture of its unit space."""

    @abc.abstractmethod
    def fit(self, context: LatencyContext) -> LatencyModel:
        """Measure (or load the cached measurements of) ``context``'s denoiser; returns ``self``."""

    @abc.abstractmethod
    def latency(self, arch: torch.Tensor) -> torch.Tensor:
        """Predicted latency (ms) of the model keeping ``arch`` (..., U) -> (...) float64,
        differentiable in ``arch`` (soft gates give a soft latency)."""

    @property
    @abc.abstractmethod
    def dense_ms(self) -> float:
        """Predicted latency (ms) of the dense model."""

    def latency_ratio(self, arch: torch.Tensor) -> torch.Tensor:
        """Latency as a fraction of the dense model's, (..., U) -> (...) in ``arch``'s float dtype."""
        ratio = self.latency(arch) / self.dense_ms
        return ratio.to(arch.dtype) if arch.is_floating_point() else ratio

    def priced_space(self, space: UnitSpace) -> UnitSpace:
        """``space`` with each unit's MACs replaced by its linearised latency (in ns, so that a
        ``clamp_min(1.0)`` on MACs stays harmless; negative noise is clamped to 0), so that
        ``priced.macs_ratio(arch)`` approximates ``latency_ratio(arch)`` and MACs-budget tools (an
        assignment's ``select_at_budget``) choose units by importance per millisecond.

        Width group: its latency with every unit kept minus with none kept, over its units. Depth
        unit: what dropping the block saves beyond its nested width units. The rest is fixed.
        Exact for the dense model; the static pruner corrects the remainder with the exact
        :meth:`latency`.
        """
        dense = space.dense().double()
        rows, what = [dense], []
        for i, g in enumerate(space.groups):
            sl = space.group_slice(i)
            if g.is_depth:  # depth: drop one unit at a time
                for j in range(g.num_units):
                    a = dense.clone()
                    a[sl.start + j] = 0.0
                    rows.append(a)
                    what.append((i, j))
            else:
                a = dense.clone()
                a[sl] = 0.0
                rows.append(a)
                what.append((i, -1))
        with torch.no_grad():
            lat = self.latency(torch.stack(rows))  # (1 + rows,)
        full = float(lat[0])
        width_ms: dict[int, float] = {}
        for (i, j), t in zip(what, lat[1:].tolist()):
            if j < 0:
                width_ms[i] = full - t
        nested: dict[str, float] = {}
        for i, g in enumerate(space.groups):
            if g.parent is not None and i in width_ms:
                nested[g.parent] = nested.get(g.parent, 0.0) + width_ms[i]
        groups: list[UnitGroup] = []
        for i, g in enumerate(space.groups):
            if g.is_depth:
                saved = [full - t for (k, _), t in zip(what, lat[1:].tolist()) if k == i]
                per = tuple(max(s - nested.get(p, 0.0), 0.0) * NS for p, s in zip(g.unit_paths, saved))
                groups.append(dataclasses.replace(g, unit_macs=per, macs_per_unit=sum(per) / len(per)))
            else:
                groups.append(dataclasses.replace(g, unit_macs=(), macs_per_unit=max(width_ms[i], 0.0) * NS / g.num_units))
        priced = dataclasses.replace(space, groups=tuple(groups), total_macs=full * NS)
        if priced.fixed_macs < 0:  # clamped noise made the units cost more than the model
            priced = dataclasses.replace(priced, total_macs=priced.prunable_macs)
        return priced
