"""ResNet inner width, in whole GroupNorm groups of ``norm2``.

Unit ``j`` of a ``ResnetBlock2D`` is the ``j``-th group of ``norm2``: ``s = C / G`` contiguous
channels of the inner width ``C`` (``conv1``'s output). Whole groups keep GroupNorm's statistics
of the surviving channels unchanged, so the cut is exact. With ``channels_per_unit`` a unit is a
run of whole groups aligned to that many channels (a hardware-friendly width, see
:func:`unit_width`); everything below holds per unit.

* gate: a forward pre-hook on ``conv2`` multiplies its input, i.e. the activations *after*
  ``norm2`` + SiLU (+ dropout), by the expanded gates ``g`` (B, G) -> (B, C, 1, 1);
* cut: ``conv1`` output channels, ``time_emb_proj`` rows (both halves for ``scale_shift``),
  ``norm2`` channels and ``num_groups``, ``conv2`` input channels. A block that loses every group
  becomes :class:`~aptp.pruners.granularities._modules.ResidualBypass` with ``conv2``'s bias (and,
  unused, ``norm1``: a width cut never removes the block's width-independent parameters, so the
  parameter count stays ``UnitSpace.kept_params`` exactly);
* parameters per unit: its ``conv1`` rows (+ bias), ``norm2`` weight and bias, ``conv2`` columns and
  ``time_emb_proj`` rows (+ bias, every half); ``norm1``, ``conv2``'s bias and ``conv_shortcut``
  belong to the block (fixed, or its depth unit);
* MACs per unit: ``(MACs(conv1) + MACs(time_emb_proj) + MACs(conv2)) / G`` (all linear in C).

With ``min_kept_channels`` an architecture keeping fewer channels than that in a block keeps none
(``UnitGroup.min_kept``, applied by the gate, the cut and the MACs / parameter / latency counts): the
block becomes the residual bypass instead of a few-channel branch whose fixed cost stays.
"""

from __future__ import annotations

import math
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
    set_module,
    slice_conv,
    slice_linear,
    trace,
    units_to_channels,
)
from aptp.pruners.granularities._modules import ResidualBypass


@dataclass
class ResnetChannelsConfig:
    """channels_per_unit: 0 (the default, the paper's) = one GroupNorm group of ``norm2`` per unit;
    ``n > 0`` = hardware-aligned units of whole groups: ``lcm(C / G, n)`` channels (e.g. 16 for a CPU's
    vector width), or the smallest multiple of that which divides the block's width ``C`` (at most
    the whole block, one unit)."""

    channels_per_unit: int = 0
    min_kept_channels: int = 0  # a block keeping fewer inner channels keeps none (0: no minimum)

    def __post_init__(self) -> None:
        if self.channels_per_unit < 0:
            raise ValueError(f"channels_per_unit={self.channels_per_unit} must be >= 0 (0: one GroupNorm group "
                             "per unit; e.g. 16 for units aligned to 16 channels).")
        if self.min_kept_channels < 0:
            raise ValueError(f"min_kept_channels={self.min_kept_channels} must be >= 0 (0: no minimum; e.g. 16: "
                             "a block keeping fewer channels becomes its residual bypass).")


def unit_width(c: int, groups: int, channels_per_unit: int) -> int:
    """Channels per unit of a ResNet of inner width ``c`` with ``groups`` GroupNorm groups: whole
    groups, aligned to ``channels_per_unit`` (0: one group), dividing ``c``."""
    s = c // groups
    if channels_per_unit <= 0:
        return s
    step = math.lcm(s, channels_per_unit)
    return next((m for m in range(step, c + 1, step) if c % m == 0), c)


def _resnets(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.resnet import ResnetBlock2D

    return [(p, m) for p, m in denoiser.named_modules() if isinstance(m, ResnetBlock2D)]


class ResnetChannels(Granularity):
    """ResNet inner channels in whole GroupNorm groups (gate before ``conv2``)."""

    config_class = ResnetChannelsConfig
    kind = "resnet_channels"
    order = 0

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        groups = []
        for path, r in _resnets(denoiser):
            c = r.conv1.out_channels  # C inner channels
            s = unit_width(c, r.norm2.num_groups, self.config.channels_per_unit)  # channels per unit
            n = c // s  # units (G with the default: one GroupNorm group each)
            macs = tr.macs(f"{path}.conv1") + tr.macs(f"{path}.conv2")
            params = s * (r.conv1.weight[0].numel() + (1 if r.conv1.bias is not None else 0))
            params += s * 2  # norm2 weight + bias
            params += s * r.conv2.weight[:, 0].numel()
            if r.time_emb_proj is not None:
                macs += tr.macs(f"{path}.time_emb_proj")
                halves = r.time_emb_proj.out_features // c
                params += s * halves * (r.time_emb_proj.in_features + (1 if r.time_emb_proj.bias is not None else 0))
            groups.append(UnitGroup(self.kind, path, n, macs / n, params,
                                    min_kept=-(-self.config.min_kept_channels // s),
                                    meta={"channels_per_unit": s}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(G,) L2 norm of the weights a group's cut removes (conv1 rows, time_emb_proj rows, conv2 columns)."""
        r = get_module(denoiser, group.path)
        c, n = r.conv1.out_channels, group.num_units
        sq = r.conv1.weight.detach().float().pow(2).flatten(1).sum(1)  # (C,)
        sq = sq + r.conv2.weight.detach().float().pow(2).transpose(0, 1).flatten(1).sum(1)
        if r.time_emb_proj is not None:
            w = r.time_emb_proj.weight.detach().float().pow(2).sum(1)  # (halves * C,)
            sq = sq + w.view(-1, c).sum(0)
        return sq.view(n, c // n).sum(1).sqrt().cpu()

    def unit_channels(self, denoiser: nn.Module, group: UnitGroup) -> UnitChannels:
        """conv2's input channels, ``C / G`` per unit (the gate's place)."""
        r = get_module(denoiser, group.path)
        return UnitChannels(r.conv2, r.conv1.out_channels // group.num_units)

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        r = get_module(denoiser, group.path)
        s = r.conv1.out_channels // group.num_units

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            g = gates()  # (B_g, G) or None
            if g is None:
                return None
            g = group.normalise(g)  # the minimum kept width, as the cut applies it
            x = args[0]  # (B, C, H, W)
            cg = units_to_channels(expand_gates(g, x.shape[0], group.path), s)  # (B, C)
            return (x * cg.to(device=x.device, dtype=x.dtype)[:, :, None, None], *args[1:])

        return HookHandles([r.conv2.register_forward_pre_hook(pre_hook)])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        r = get_module(denoiser, group.path)
        c = r.conv1.out_channels
        s = c // group.num_units
        keep = group.normalise(keep.to(torch.bool))  # fewer than min_kept units: none
        if not bool(keep.any()):  # the branch is gone; conv2 of zeros is its bias
            set_module(denoiser, group.path,
                       ResidualBypass(r.conv_shortcut, r.output_scale_factor, r.conv2.bias, norm1=r.norm1))
            return
        idx = channel_index(keep, s)  # (k * s,)
        slice_conv(r.conv1, out=idx)
        if r.time_emb_proj is not None:
            halves = r.time_emb_proj.out_features // c
            rows = torch.cat([idx + h * c for h in range(halves)])
            slice_linear(r.time_emb_proj, rows=rows)
        n2 = r.norm2
        per_unit = n2.num_groups // group.num_units  # GroupNorm groups per unit (1 by default)
        n2.weight = nn.Parameter(n2.weight[idx.to(n2.weight.device)].clone(), n2.weight.requires_grad)
        n2.bias = nn.Parameter(n2.bias[idx.to(n2.bias.device)].clone(), n2.bias.requires_grad)
        n2.num_channels, n2.num_groups = int(idx.numel()), int(keep.sum()) * per_unit
        slice_conv(r.conv2, inp=idx)
