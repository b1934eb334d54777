"""Granularities for timm's own module types, in any denoiser made of them.

Each gate multiplies activations exactly where the physical cut removes them (a forward pre-hook
on the *consumer* of the pruned width), so a hard-gated model and the cut model compute the same
function; cuts copy the dense weights first, then slice (nothing is re-initialised).

===============  =============================  ==============================  ===========================
registered name  unit                           gate                            physical cut
===============  =============================  ==============================  ===========================
``timm_heads``   one head of ``timm.layers.     input of ``proj`` (B, N, h d)   ``qkv`` rows of the head in
                 Attention`` (fused qkv)        x per-head gate                 q, k and v; ``gate`` rows;
                                                                                ``proj`` columns;
                                                                                ``num_heads``, ``attn_dim``
``timm_mlp``     a group of the hidden width    input of ``fc2`` (B, N, H)      ``fc1`` rows, ``fc2``
                 of ``timm.layers.Mlp``         x per-group gate                columns
``timm_blocks``  a whole ViT ``Block``          residual bypass                 block -> ``nn.Identity``
                 (pre-norm residual)            ``y <- x + g (y - x)``
===============  =============================  ==============================  ===========================

Hooks, cuts and tracing use aptp's public unit-space toolkit
(:mod:`aptp.pruners.granularities.toolkit`), as aptp's built-in granularities do. MACs per unit come
from its analytic tracer (:func:`~aptp.pruners.granularities.toolkit.trace`, one forward on the
``meta`` device), which counts ``nn.Linear`` / ``nn.Conv2d`` matmuls and, through the
formula :mod:`aptp_timm.macs` registers, the two attention matmuls of timm's ``Attention``
(``Q K^T``, ``P V``: ``2 N^2 d`` per head). Each head's unit carries its share of them, as aptp's
built-in ``attention_heads`` does for diffusers' ``Attention``, so the analytic MACs agree with
``FlopCounterMode`` for any architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from aptp.core.interfaces import Conditioning, GateGetter, Granularity
from aptp.core.units import UnitGroup
from aptp.pruners.granularities.toolkit import (
    HookHandles,
    channel_index,
    expand_gates,
    get_module,
    set_module,
    slice_linear,
    trace,
    units_to_channels,
)
from aptp_timm.macs import attention_macs  # noqa: F401  (registers timm Attention's MACs formula)


# ------------------------------------------------------------------------------------- helpers
def _linear_params(lin: nn.Linear, rows: int = 0, cols: int = 0) -> int:
    """Parameters of ``rows`` output rows (weights + bias) plus ``cols`` input columns of ``lin``."""
    return rows * (lin.in_features + (1 if lin.bias is not None else 0)) + cols * lin.out_features


def _modules(denoiser: nn.Module, cls: type) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in denoiser.named_modules() if type(m) is cls]


def _gate_input(width: int, gates: GateGetter, where: str) -> Callable[[nn.Module, tuple], tuple | None]:
    """A forward pre-hook multiplying the consumer's input (B, N, n * width) by unit gates (B, n)."""

    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        g = gates()  # (B_g, n) or None (ungated)
        if g is None:
            return None
        x = args[0]  # (B, N, n * width)
        cg = units_to_channels(expand_gates(g, x.shape[0], where), width)  # (B, n * width)
        return (x * cg.to(x.dtype).unsqueeze(1), *args[1:])

    return pre_hook


# ------------------------------------------------------------------------------------ heads
@dataclass
class TimmHeadsConfig:
    """Whole heads of every ``timm.layers.Attention`` (no parameters)."""


class TimmHeads(Granularity):
    """Heads of timm's fused-qkv ``Attention`` (gate before ``proj``; cut qkv rows / proj columns)."""

    config_class = TimmHeadsConfig
    kind = "timm_heads"

    @staticmethod
    def _check(path: str, attn: nn.Module) -> None:
        if not isinstance(attn.norm, nn.Identity):
            raise ValueError(f"{path}: timm Attention with scale_norm (a {type(attn.norm).__name__} over all heads "
                             "before proj) mixes heads, so a per-head gate is not exact; drop 'timm_heads' here.")

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        groups = []
        for path, a in _modules(denoiser, Attention):
            self._check(path, a)
            h, d = a.num_heads, a.head_dim
            parts = ["qkv", "proj"] + (["gate"] if a.gate is not None else [])
            # projections + the attention's own Q K^T and P V (aptp_timm.macs): all linear in heads
            macs = sum(tr.macs(f"{path}.{n}") for n in parts) + tr.macs(path)
            params = _linear_params(a.qkv, rows=3 * d) + _linear_params(a.proj, cols=d)
            if a.gate is not None:
                params += _linear_params(a.gate, rows=d)
            groups.append(UnitGroup(self.kind, path, h, macs / h, params, meta={"head_dim": d}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(h,) L2 norm of each head's q, k, v (and gate) rows and proj columns."""
        a = get_module(denoiser, group.path)
        sq = a.qkv.weight.detach().float().pow(2).sum(1).view(3, -1).sum(0)  # (h d,)
        if a.gate is not None:
            sq = sq + a.gate.weight.detach().float().pow(2).sum(1)
        sq = sq + a.proj.weight.detach().float().pow(2).sum(0)
        return sq.view(group.num_units, -1).sum(1).sqrt().cpu()

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        a = get_module(denoiser, group.path)
        return HookHandles([a.proj.register_forward_pre_hook(_gate_input(a.head_dim, gates, group.path))])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        a = get_module(denoiser, group.path)
        idx = channel_index(keep, a.head_dim)  # (k d,) within one of q, k, v
        width = a.attn_dim  # h d: qkv rows are [q | k | v], each (heads, head_dim) row-major
        slice_linear(a.qkv, rows=torch.cat([idx + part * width for part in range(3)]))
        if a.gate is not None:
            slice_linear(a.gate, rows=idx)
        slice_linear(a.proj, cols=idx)
        a.num_heads = int(keep.to(torch.bool).sum())
        a.attn_dim = int(idx.numel())


# -------------------------------------------------------------------------------------- mlp
@dataclass
class TimmMlpConfig:
    """num_units: groups of the hidden width per ``Mlp`` (must divide it; capped at the width)."""

    num_units: int = 16

    def __post_init__(self) -> None:
        if self.num_units < 1:
            raise ValueError(f"num_units={self.num_units} must be >= 1 (e.g. 16 or 32 groups per Mlp).")


class TimmMlp(Granularity):
    """Hidden width of timm's ``Mlp`` in groups (gate before ``fc2``; cut fc1 rows / fc2 columns)."""

    config_class = TimmMlpConfig
    kind = "timm_mlp"

    def _layout(self, path: str, mlp: nn.Module) -> tuple[int, int]:
        """(n units, channels per unit)."""
        if not isinstance(mlp.fc1, nn.Linear):
            raise ValueError(f"{path}: Mlp with use_conv=True ({type(mlp.fc1).__name__}) is not supported; drop 'timm_mlp'.")
        if not isinstance(mlp.norm, nn.Identity):
            raise ValueError(f"{path}: Mlp with a {type(mlp.norm).__name__} over its hidden width mixes the groups, "
                             "so a gate before fc2 is not exact; drop 'timm_mlp' for this model.")
        f = mlp.fc2.in_features
        n = min(self.config.num_units, f)
        if f % n:
            raise ValueError(f"{path}: hidden width {f} is not divisible by num_units={self.config.num_units}; "
                             f"choose a divisor of {f}.")
        return n, f // n

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        groups = []
        for path, m in _modules(denoiser, Mlp):
            n, s = self._layout(path, m)
            macs = tr.macs(f"{path}.fc1") + tr.macs(f"{path}.fc2")
            params = _linear_params(m.fc1, rows=s) + _linear_params(m.fc2, cols=s)
            groups.append(UnitGroup(self.kind, path, n, macs / n, params, meta={"channels_per_unit": s}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(n,) L2 norm of each group's fc1 rows and fc2 columns."""
        m = get_module(denoiser, group.path)
        sq = m.fc1.weight.detach().float().pow(2).sum(1) + m.fc2.weight.detach().float().pow(2).sum(0)  # (H,)
        return sq.view(group.num_units, -1).sum(1).sqrt().cpu()

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        m = get_module(denoiser, group.path)
        s = m.fc2.in_features // group.num_units
        return HookHandles([m.fc2.register_forward_pre_hook(_gate_input(s, gates, group.path))])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        m = get_module(denoiser, group.path)
        idx = channel_index(keep, m.fc2.in_features // group.num_units)  # (kept hidden channels,)
        slice_linear(m.fc1, rows=idx)
        slice_linear(m.fc2, cols=idx)


# ----------------------------------------------------------------------------------- blocks
@dataclass
class TimmBlocksConfig:
    """protect: blocks at each end of every stack that are never dropped (DiT's first and last
    blocks carry the most)."""

    protect: int = 1

    def __post_init__(self) -> None:
        if self.protect < 0:
            raise ValueError(f"protect={self.protect} must be >= 0 (blocks kept at each end of a stack).")


def _middle_out(indices: list[int]) -> list[int]:
    """Drop priority within a stack: the middle block first, then alternating outwards."""
    mid = (len(indices) - 1) / 2
    return sorted(indices, key=lambda i: (abs(i - mid), i))


class TimmBlocks(Granularity):
    """Whole timm ViT ``Block`` s as droppable units (residual bypass: a dropped block is the identity)."""

    config_class = TimmBlocksConfig
    kind = "timm_blocks"
    group_path = "timm_blocks"

    def block_paths(self, denoiser: nn.Module) -> list[str]:
        """Droppable blocks in drop priority (unit 0 drops first): per stack (blocks sharing a
        parent), middle-out, the ``protect`` first and last blocks excluded."""
        stacks: dict[str, list[str]] = {}
        for path, _ in _modules(denoiser, Block):
            stacks.setdefault(path.rpartition(".")[0], []).append(path)
        out: list[str] = []
        for paths in stacks.values():
            k = self.config.protect
            inner = list(range(k, len(paths) - k))
            out += [paths[i] for i in _middle_out(inner)]
        if not out:
            raise ValueError(f"no droppable timm Block in {type(denoiser).__name__} with protect={self.config.protect}; "
                             "lower protect or drop 'timm_blocks'.")
        return out

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        paths = self.block_paths(denoiser)
        macs = [tr.macs_under(p) for p in paths]
        params = [sum(t.numel() for t in get_module(denoiser, p).parameters()) for p in paths]
        return [UnitGroup(self.kind, self.group_path, len(paths), sum(macs) / len(paths), sum(params) // len(paths),
                          unit_paths=tuple(paths), unit_macs=tuple(macs), unit_params=tuple(params),
                          meta={"order": "drop priority: unit 0 drops first"})]

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        handles = []
        for j, p in enumerate(group.unit_paths):

            def hook(module: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor, j: int = j, p: str = p) -> Any:
                g = gates()  # (B_g, n) or None
                if g is None:
                    return None
                x = args[0] if args else kwargs["x"]  # (B, N, D), the block's input = its bypass
                gj = expand_gates(g, y.shape[0], p)[:, j].to(device=y.device, dtype=y.dtype)
                gj = gj.view(-1, *[1] * (y.dim() - 1))  # (B, 1, 1): the output's rank
                return x + gj * (y - x)

            handles.append(get_module(denoiser, p).register_forward_hook(hook, with_kwargs=True))
        return HookHandles(handles)

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        for j, p in enumerate(group.unit_paths):
            if not bool(keep[j]):
                set_module(denoiser, p, nn.Identity())
