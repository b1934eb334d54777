"""Depth: the last ResNet and the last Transformer of each down/up stage of a UNet (14 on SD2.1).

Units form ONE unit group of kind ``depth``; ``unit_paths[j]`` is the block of unit ``j``. Units are
listed in **drop priority**: unit 0 drops first. Stages go from the lowest resolution to the
highest and each encoder block is followed by its decoder twin (``down_blocks[i]`` with
``up_blocks[n-1-i]``); within a stage the Transformer pair comes before the ResNet pair. A monotone
keep-probability over this order (softmax -> cumsum -> reversed, see method.md) thus drops blocks
lowest-resolution first, encoder/decoder in pairs.

What "block -> identity" means physically (depth as a *residual bypass*):

* ``Transformer2DModel``: output = ``proj_out(...) + residual``; dropped, it returns its input.
  Gate: forward hook ``y <- x + g (y - x)``; cut: :class:`SkipTransformer`.
* ``ResnetBlock2D``: output = ``(shortcut(x) + F(x)) / output_scale_factor``; dropped, the residual
  branch ``F`` goes and the shortcut stays. In down stages the last ResNet has in == out channels
  (shortcut = identity: the block becomes the identity). In up stages every ResNet takes
  ``cat(h, skip)`` and changes the width, so no identity exists; the bypass keeps the block's 1x1
  ``conv_shortcut`` (a few % of the block's MACs), which preserves the skip connection's
  information and the output width. Gate: forward hook ``y <- b + g (y - b)``,
  ``b = shortcut(x) / osf``; cut: :class:`ResidualBypass`.

MACs per unit are the block's removable MACs (all of it for a Transformer, all but
``conv_shortcut`` for a ResNet); :func:`aptp.pruners.gating.build_unit_space` subtracts the width
units nested inside (whose ``parent`` it sets to the depth unit's path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aptp.core.interfaces import Conditioning, GateGetter, Granularity
from aptp.core.units import UnitGroup
from aptp.pruners.granularities._common import HookHandles, expand_gates, get_module, set_module, trace
from aptp.pruners.granularities._modules import ResidualBypass, SkipTransformer


@dataclass
class DepthConfig:
    """resnets / transformers: whether the last ResNet / Transformer of each stage is a unit."""

    resnets: bool = True
    transformers: bool = True

    def __post_init__(self) -> None:
        if not (self.resnets or self.transformers):
            raise ValueError("depth with resnets=False and transformers=False has no units; enable one of them.")


def _block_out(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def _with_out(output: Any, y: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (y, *output[1:])
    if hasattr(output, "sample"):
        output.sample = y
        return output
    return y


class Depth(Granularity):
    """Last ResNet and last Transformer of each down/up stage as droppable blocks (residual bypass)."""

    config_class = DepthConfig
    kind = "depth"
    group_path = "depth"

    def block_paths(self, denoiser: nn.Module) -> list[str]:
        """Depth units in drop priority (unit 0 drops first)."""
        down, up = getattr(denoiser, "down_blocks", None), getattr(denoiser, "up_blocks", None)
        if down is None or up is None or len(down) != len(up):
            raise ValueError(
                f"depth needs a UNet with as many down_blocks as up_blocks, got {type(denoiser).__name__}; "
                "drop the 'depth' granularity for this denoiser."
            )
        n = len(down)
        out: list[str] = []
        for i in reversed(range(n)):  # lowest resolution first
            pair = [(f"down_blocks.{i}", down[i]), (f"up_blocks.{n - 1 - i}", up[n - 1 - i])]
            if self.config.transformers:
                out += [f"{p}.attentions.{len(b.attentions) - 1}" for p, b in pair if getattr(b, "attentions", None)]
            if self.config.resnets:
                out += [f"{p}.resnets.{len(b.resnets) - 1}" for p, b in pair if getattr(b, "resnets", None)]
        for p in out:
            m = get_module(denoiser, p)
            if getattr(m, "upsample", None) is not None or getattr(m, "downsample", None) is not None:
                raise ValueError(f"{p} resamples its input; a residual bypass cannot drop it. Drop 'depth'.")
        return out

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        paths = self.block_paths(denoiser)
        macs, params = [], []
        for p in paths:
            m = get_module(denoiser, p)
            kept = getattr(m, "conv_shortcut", None)  # what the bypass keeps
            macs.append(tr.macs_under(p) - (tr.macs(f"{p}.conv_shortcut") if kept is not None else 0.0))
            params.append(sum(t.numel() for t in m.parameters())
                          - (sum(t.numel() for t in kept.parameters()) if kept is not None else 0))
        return [UnitGroup(self.kind, self.group_path, len(paths), sum(macs) / max(len(paths), 1),
                          sum(params) // max(len(paths), 1), unit_paths=tuple(paths),
                          unit_macs=tuple(macs), unit_params=tuple(params),
                          meta={"order": "drop priority: unit 0 drops first"})]

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        from diffusers.models.resnet import ResnetBlock2D

        handles = []
        for j, p in enumerate(group.unit_paths):
            m = get_module(denoiser, p)
            resnet = isinstance(m, ResnetBlock2D)

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, j: int = j, resnet: bool = resnet) -> Any:
                g = gates()  # (B_g, U_depth) or None
                if g is None:
                    return None
                y = _block_out(output)
                x = args[0] if args else kwargs["input_tensor" if resnet else "hidden_states"]
                if resnet:  # b = shortcut(x) / osf, what the bypass computes
                    b = module.conv_shortcut(x) if module.conv_shortcut is not None else x
                    b = b / module.output_scale_factor
                else:
                    b = x
                gj = expand_gates(g, y.shape[0], p)[:, j].to(device=y.device, dtype=y.dtype)  # (B,)
                gj = gj[:, None, None, None]  # (B, 1, 1, 1)
                return _with_out(output, b + gj * (y - b))

            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        return HookHandles(handles)

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        from diffusers.models.resnet import ResnetBlock2D

        for j, p in enumerate(group.unit_paths):
            if bool(keep[j]):
                continue
            m = get_module(denoiser, p)
            if isinstance(m, (ResnetBlock2D, ResidualBypass)):
                set_module(denoiser, p, ResidualBypass(m.conv_shortcut, m.output_scale_factor))
            else:
                set_module(denoiser, p, SkipTransformer())
