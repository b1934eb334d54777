"""Feed-forward width: the inner width of every diffusers ``FeedForward`` in groups.

A ``FeedForward`` is ``net = [act(proj: C -> k * F), Dropout, Linear(F -> C), ...]`` with ``k = 2``
halves for gated activations (GEGLU, SwiGLU: value and gate) and ``k = 1`` otherwise. Unit ``j``
is a contiguous run of ``s = F / n`` inner channels (``n = num_units``, 32 as in the paper).

* gate: a forward pre-hook on ``net[2]`` multiplies its input (B, N, F) by ``g`` (B, n) expanded;
* cut: ``proj`` rows of the unit in *each* half, ``net[2]`` columns (a fully cut FFN keeps zero-width
  linears: ``net[2]`` of an empty input is its bias, exactly the gated value);
* MACs per unit: ``(MACs(proj) + MACs(net[2])) / n``.

Hardware-aligned units (``channels_per_unit``, an option; 0, the default, keeps ``num_units``): a
unit is ``s`` inner channels, the smallest multiple of ``channels_per_unit`` that divides ``F`` (the
whole FFN when none does), so ``n = F / s`` units; a cut then always keeps a multiple of ``s``
channels. With ``min_kept_channels`` an architecture keeping fewer inner channels than that keeps
none (``UnitGroup.min_kept``, applied by the gate, the cut and the MACs / parameter / latency counts).

FLUX's single blocks (``FluxSingleTransformerBlock``) run their MLP in parallel with attention:
``proj_out(cat([attn (B, N, h d), act(proj_mlp(x)) (B, N, F)]))``. Their MLP is the same kind of unit
(group path = the block): ``proj_mlp`` rows and the last ``F`` input columns of the fused ``proj_out``
(the gate multiplies those columns; MACs count ``proj_out`` for its ``F`` columns' share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aptp.core.interfaces import Conditioning, GateGetter, Granularity, UnitChannels
from aptp.core.units import UnitGroup
from aptp.pruners.granularities.toolkit import (
    HookHandles,
    channel_index,
    expand_gates,
    get_module,
    slice_linear,
    trace,
    units_to_channels,
)


@dataclass
class FFNConfig:
    """num_units: groups per feed-forward (must divide its inner width); channels_per_unit: 0 (the
    default, the paper's) = ``num_units`` groups; ``n > 0`` = units of the smallest multiple of ``n``
    inner channels dividing the width (e.g. 16 for a CPU's vector width; overrides num_units);
    min_kept_channels: a feed-forward keeping fewer inner channels keeps none (0: no minimum)."""

    num_units: int = 32
    channels_per_unit: int = 0
    min_kept_channels: int = 0

    def __post_init__(self) -> None:
        if self.num_units < 1:
            raise ValueError(f"num_units={self.num_units} must be >= 1 (the paper uses 32 groups per FFN).")
        if self.channels_per_unit < 0:
            raise ValueError(f"channels_per_unit={self.channels_per_unit} must be >= 0 (0: num_units groups per "
                             "FFN; e.g. 16 for units aligned to 16 channels).")
        if self.min_kept_channels < 0:
            raise ValueError(f"min_kept_channels={self.min_kept_channels} must be >= 0 (0: no minimum).")


def _is_fused_mlp(m: nn.Module) -> bool:
    """A parallel attention + MLP block with a fused output (FLUX's ``FluxSingleTransformerBlock``)."""
    proj, out = getattr(m, "proj_mlp", None), getattr(m, "proj_out", None)
    return isinstance(proj, nn.Linear) and isinstance(out, nn.Linear) and out.in_features >= proj.out_features


def _feedforwards(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import FeedForward

    return [(p, m) for p, m in denoiser.named_modules() if isinstance(m, FeedForward) or _is_fused_mlp(m)]


def _layout(ff: nn.Module) -> tuple[nn.Linear, nn.Linear, int, int, int]:
    """(proj, out, F inner width, k halves, first input column of ``out`` that the MLP feeds)."""
    if _is_fused_mlp(ff):  # proj_out(cat([attention, mlp])): the MLP owns the last F columns
        proj, out = ff.proj_mlp, ff.proj_out
        return proj, out, proj.out_features, 1, out.in_features - proj.out_features
    proj, out = ff.net[0].proj, ff.net[2]
    f = out.in_features
    if proj.out_features % f:
        raise ValueError(f"feed-forward proj width {proj.out_features} is no multiple of its inner width {f}.")
    return proj, out, f, proj.out_features // f, 0


class FFN(Granularity):
    """Feed-forward (GEGLU) inner width in groups (gate before ``net[2]``)."""

    config_class = FFNConfig
    kind = "ffn"
    order = 2

    def _units(self, f: int, path: str) -> int:
        if self.config.channels_per_unit > 0:  # the smallest multiple of channels_per_unit dividing f
            step = self.config.channels_per_unit
            return f // next((m for m in range(step, f + 1, step) if f % m == 0), f)
        n = min(self.config.num_units, f)
        if f % n:
            raise ValueError(
                f"{path}: inner width {f} is not divisible by num_units={self.config.num_units}; choose a divisor of {f}."
            )
        return n

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        groups = []
        for path, ff in _feedforwards(denoiser):
            proj, out, f, k, _ = _layout(ff)
            n = self._units(f, path)
            s = f // n
            rel = {id(m): q for q, m in ff.named_modules()}  # net.0.proj / net.2, or proj_mlp / proj_out
            macs = tr.macs(f"{path}.{rel[id(proj)]}") + tr.macs(f"{path}.{rel[id(out)]}") * f / out.in_features
            params = s * k * (proj.in_features + (1 if proj.bias is not None else 0)) + s * out.out_features
            groups.append(UnitGroup(self.kind, path, n, macs / n, params,
                                    min_kept=-(-self.config.min_kept_channels // s),
                                    meta={"channels_per_unit": s, "halves": k}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(n,) L2 norm of each group's proj rows (every half) and net[2] columns."""
        proj, out, f, k, off = _layout(get_module(denoiser, group.path))
        sq = proj.weight.detach().float().pow(2).sum(1).view(k, f).sum(0)  # (F,)
        sq = sq + out.weight.detach().float()[:, off:off + f].pow(2).sum(0)
        return sq.view(group.num_units, -1).sum(1).sqrt().cpu()

    def unit_channels(self, denoiser: nn.Module, group: UnitGroup) -> UnitChannels:
        """``net[2]``'s input channels, ``F / n`` per unit (the gate's place); FLUX's fused blocks are refused."""
        _, out, f, _, off = _layout(get_module(denoiser, group.path))
        if off:
            raise NotImplementedError(f"{group.path}: the MLP feeds a fused proj_out from column {off}; cut it with "
                                      "aptp's own cut (cut_backend: aptp), not a channel pruner.")
        return UnitChannels(out, f // group.num_units)

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        _, out, f, _, off = _layout(get_module(denoiser, group.path))
        s = f // group.num_units

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            g = gates()  # (B_g, n) or None
            if g is None:
                return None
            g = group.normalise(g)  # the minimum kept width, as the cut applies it
            x = args[0]  # (B, N, F); a fused proj_out: (B, N, h d + F)
            cg = units_to_channels(expand_gates(g, x.shape[0], group.path), s)  # (B, F)
            cg = cg.to(device=x.device, dtype=x.dtype).unsqueeze(1)  # (B, 1, F)
            if off:
                return (torch.cat([x[..., :off], x[..., off:] * cg], dim=-1), *args[1:])
            return (x * cg, *args[1:])

        return HookHandles([out.register_forward_pre_hook(pre_hook)])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        ff = get_module(denoiser, group.path)
        proj, out, f, k, off = _layout(ff)
        keep = group.normalise(keep.to(torch.bool))  # fewer than min_kept units: none
        idx = channel_index(keep, f // group.num_units)  # (kept channels,)
        slice_linear(proj, rows=torch.cat([idx + h * f for h in range(k)]))
        slice_linear(out, cols=torch.cat([torch.arange(off), off + idx]) if off else idx)
