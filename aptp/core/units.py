"""The unit space: every prunable unit of a denoiser, in a fixed order, with its cost.

An *architecture* is a vector over the unit space, shape (U,) or batched (..., U), with 1 where a
unit is kept (soft values in [0, 1] while training). Width units inside a block that a depth unit
can drop name that depth unit as ``parent``: dropping the block drops them too, and the resource
model counts them only while their parent is kept.

A width group may have a *minimum kept width* (``UnitGroup.min_kept``, set by a granularity's
``min_kept_channels`` / ``min_kept_heads``): an architecture keeping fewer than ``min_kept`` of its
units keeps none of them (the block's width path is removed). :meth:`UnitSpace.normalise` applies
the rule; the resource counts (``kept_macs``, ``kept_params``), the latency models, the gates and the
cut all read architectures through it, so raw architectures stay valid everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch

from aptp.core.errors import IncompatibleError, ShapeError


@dataclass(frozen=True)
class UnitGroup:
    """A run of units of one kind in one module, e.g. the 32 channel groups of one ResNet."""

    kind: str  # registered granularity name, e.g. "resnet_channels"
    path: str  # module path in the denoiser (for depth: a label; units name their own modules)
    num_units: int
    macs_per_unit: float  # per-sample MACs one unit costs, at the unit space's conditioning
    params_per_unit: int
    parent: str | None = None  # unit path of the depth unit whose removal removes this group
    unit_paths: tuple[str, ...] = ()  # depth groups only: the block of each unit (see is_depth)
    unit_macs: tuple[float, ...] = ()  # optional: per-unit MACs where units differ (overrides)
    unit_params: tuple[int, ...] = ()  # optional: per-unit parameters where units differ
    min_kept: int = 0  # width groups: fewer kept units than this keep none (0, 1: no effect)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_depth(self) -> bool:
        """Whether this is a depth group: its units are whole blocks, named in ``unit_paths`` and
        listed in drop priority (unit 0 drops first). A granularity declares a depth group by giving
        ``unit_paths``; the unit space (nesting, budgets, latency) and the router's monotone depth
        gates (:class:`aptp.routers.predictor.RawLayout`) read it here, whatever the kind's name."""
        return bool(self.unit_paths)

    def normalise(self, gates: torch.Tensor) -> torch.Tensor:
        """Gates (..., n) of this group with the minimum kept width applied: rows keeping fewer than
        ``min_kept`` units (counted as the sum of the gates) become zero. Forward values are exact
        (0/1 gates stay 0/1); the gradient is the identity (straight-through), so a row held below
        the minimum still learns what its units are worth."""
        if self.min_kept <= 1 or self.is_depth:
            return gates
        keep = gates.detach().to(torch.float64).sum(-1, keepdim=True) >= self.min_kept - 1e-6  # (..., 1) bool
        if not gates.is_floating_point():  # a bool / int keep mask (the cut)
            return gates * keep.to(gates.dtype)
        return torch.where(keep, gates, gates - gates.detach())

    def macs_of_units(self) -> list[float]:
        return list(self.unit_macs) if self.unit_macs else [float(self.macs_per_unit)] * self.num_units

    def params_of_units(self) -> list[int]:
        return list(self.unit_params) if self.unit_params else [int(self.params_per_unit)] * self.num_units


@dataclass(frozen=True)
class UnitSpace:
    """Ordered unit groups of a denoiser plus the dense model's totals."""

    groups: tuple[UnitGroup, ...]
    total_macs: float  # per-sample MACs of the dense denoiser at ``sample_shape`` / ``text_len``
    total_params: int
    sample_shape: tuple[int, ...] = ()
    text_len: int = 0

    # --- layout -------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """U, the number of units."""
        return sum(g.num_units for g in self.groups)

    @cached_property
    def offsets(self) -> list[int]:
        out, o = [], 0
        for g in self.groups:
            out.append(o)
            o += g.num_units
        return out

    def group_slice(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.groups[index].num_units)

    def split(self, arch: torch.Tensor) -> list[torch.Tensor]:
        """(..., U) -> one (..., n_g) view per group."""
        self.check(arch)
        return [arch[..., self.group_slice(i)] for i in range(len(self.groups))]

    def kinds(self) -> list[str]:
        return sorted({g.kind for g in self.groups})

    def mask_of_kind(self, kind: str) -> torch.Tensor:
        """(U,) bool, True on the units of granularity ``kind``."""
        m = torch.zeros(self.size, dtype=torch.bool)
        for i, g in enumerate(self.groups):
            if g.kind == kind:
                m[self.group_slice(i)] = True
        return m

    @cached_property
    def has_min_kept(self) -> bool:
        return any(g.min_kept > 1 and not g.is_depth for g in self.groups)

    def normalise(self, arch: torch.Tensor) -> torch.Tensor:
        """``arch`` (..., U) with every width group's minimum kept width applied
        (:meth:`UnitGroup.normalise`): what the cut model keeps. ``arch`` itself when no group has one."""
        self.check(arch)
        if not self.has_min_kept:
            return arch
        return torch.cat([g.normalise(arch[..., self.group_slice(i)]) for i, g in enumerate(self.groups)], dim=-1)

    def check(self, arch: torch.Tensor, name: str = "architecture") -> None:
        if arch.shape[-1:] != (self.size,):
            raise ShapeError(
                f"{name} must have shape (..., {self.size}) for this unit space, got {tuple(arch.shape)}."
            )

    # --- resources ----------------------------------------------------------------------------
    @cached_property
    def _unit_macs(self) -> torch.Tensor:  # (U,) float64
        return torch.tensor([m for g in self.groups for m in g.macs_of_units()], dtype=torch.float64)

    @cached_property
    def _unit_params(self) -> torch.Tensor:  # (U,) float64
        return torch.tensor([p for g in self.groups for p in g.params_of_units()], dtype=torch.float64)

    @cached_property
    def _parent_index(self) -> torch.Tensor:  # (U,) long, index of the parent depth unit or -1
        where: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            for j, p in enumerate(g.unit_paths):
                where[p] = self.offsets[i] + j
        idx = []
        for g in self.groups:
            if g.parent is not None and g.parent not in where:
                raise ValueError(f"unit group {g.path!r} names parent {g.parent!r}, which is no unit.")
            idx += [where[g.parent] if g.parent is not None else -1] * g.num_units
        return torch.tensor(idx, dtype=torch.long)

    @property
    def prunable_macs(self) -> float:
        return float(self._unit_macs.sum())

    @property
    def fixed_macs(self) -> float:
        """MACs outside every unit: always paid."""
        return self.total_macs - self.prunable_macs

    def _kept(self, arch: torch.Tensor, per_unit: torch.Tensor, fixed: float) -> torch.Tensor:
        """Float64 sums (a float32 sum of SD2.1's 866 M parameters is off by tens); differentiable."""
        a = self.normalise(arch.to(torch.float64))
        per_unit = per_unit.to(device=a.device, dtype=a.dtype)
        parent = self._parent_index.to(a.device)
        has_parent = parent >= 0
        p = torch.ones_like(a)
        if bool(has_parent.any()):
            p = torch.where(has_parent, a[..., parent.clamp(min=0)], p)
        return fixed + (a * p * per_unit).sum(dim=-1)

    def kept_macs(self, arch: torch.Tensor) -> torch.Tensor:
        """Per-sample MACs of the model that keeps ``arch`` (..., U) -> (...) float64. Differentiable."""
        return self._kept(arch, self._unit_macs, self.fixed_macs)

    def macs_ratio(self, arch: torch.Tensor) -> torch.Tensor:
        """Kept MACs as a fraction of the dense model's, (..., U) -> (...) in ``arch``'s float dtype."""
        ratio = self.kept_macs(arch) / self.total_macs
        return ratio.to(arch.dtype) if arch.is_floating_point() else ratio

    def kept_params(self, arch: torch.Tensor) -> torch.Tensor:
        """Parameters of the model that keeps ``arch`` (..., U) -> (...) float64."""
        return self._kept(arch, self._unit_params, float(self.total_params - self._unit_params.sum()))

    def dense(self) -> torch.Tensor:
        """The architecture that keeps everything, (U,)."""
        return torch.ones(self.size)

    # --- identity and storage -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short hash of the layout (kinds, paths, unit counts): equal spaces, equal fingerprints."""
        layout = [(g.kind, g.path, g.num_units, g.parent, list(g.unit_paths)) for g in self.groups]
        if self.has_min_kept:  # the same units cut differently: another space (unchanged hash without)
            layout.append(["min_kept", [g.min_kept for g in self.groups]])
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

    def require_same(self, other_fingerprint: str, what: str) -> None:
        if other_fingerprint != self.fingerprint():
            raise IncompatibleError(
                f"{what} was made for unit space {other_fingerprint}, but this model's unit space is "
                f"{self.fingerprint()} (U={self.size}). Use the backbone and granularities it was "
                "made with, or retrain it for this one."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint(),
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "sample_shape": list(self.sample_shape),
            "text_len": self.text_len,
            "groups": [{k: v for k, v in asdict(g).items() if k != "meta"} for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitSpace:
        groups = tuple(
            UnitGroup(**{**g, "unit_paths": tuple(g.get("unit_paths", ())),
                         "unit_macs": tuple(g.get("unit_macs", ())),
                         "unit_params": tuple(g.get("unit_params", ()))})
            for g in data["groups"]
        )
        space = cls(groups, float(data["total_macs"]), int(data["total_params"]),
                    tuple(data.get("sample_shape", ())), int(data.get("text_len", 0)))
        if "fingerprint" in data:
            space.require_same(data["fingerprint"], "the stored unit space")
        return space
