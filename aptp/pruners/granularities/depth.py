"""Depth: droppable blocks of a denoiser, as residual bypasses.

Units form ONE unit group of kind ``depth``; ``unit_paths[j]`` is the block of unit ``j``. Units are
listed in **drop priority**: unit 0 drops first, so a monotone keep-probability over this order
(softmax -> cumsum -> reversed, see method.md) drops blocks in that fixed order.

Which blocks, in which order:

* **UNet** (``down_blocks`` / ``up_blocks``, 14 units on SD2.1): the last ResNet and the last
  Transformer of each down/up stage. Stages go from the lowest resolution to the highest and each
  encoder block is followed by its decoder twin (``down_blocks[i]`` with ``up_blocks[n-1-i]``);
  within a stage the Transformer pair comes before the ResNet pair: lowest resolution first,
  encoder/decoder in pairs.
* **Transformer denoiser** (DiT / PixArt: a top-level ``transformer_blocks`` list of diffusers
  ``BasicTransformerBlock`` s): every block but the ``protect`` first and ``protect`` last ones, in
  **middle-out** order -- the middle block first, then alternating outwards (ties: the earlier
  block first). DiTs have no resolution hierarchy to order by; block-removal studies of DiTs
  (e.g. TinyFusion, arXiv 2412.01199; "Learning-to-Cache", arXiv 2406.01733) find the middle
  blocks the most redundant and the first and last blocks (patch-token entry, output head) the
  most important, hence ``protect=1`` by default. PixArt-alpha (28 blocks) gets 26 units:
  ``13, 14, 12, 15, ..., 1, 26``.
* **Two-stream transformers** (SD3: ``transformer_blocks`` of ``JointTransformerBlock``; FLUX:
  ``transformer_blocks`` of ``FluxTransformerBlock`` then ``single_transformer_blocks`` of
  ``FluxSingleTransformerBlock``): the stacks are read as one sequence of blocks and ordered
  middle-out over it, never dropping the ``protect`` first and last blocks *of each stack* (FLUX: the
  first and last double- and single-stream blocks, where the text and image streams enter, merge
  and leave). SD3-medium (24 blocks) gets 22 units; FLUX.1 (19 + 38) gets 53.

What "block -> identity" means physically (depth as a *residual bypass*):

* ``Transformer2DModel`` (UNet): output = ``proj_out(...) + residual``; dropped, it returns its
  input. Gate: forward hook ``y <- x + g (y - x)``; cut: :class:`SkipTransformer`.
* ``BasicTransformerBlock`` (DiT): output = ``x + attn1(...) + attn2(...) + ff(...)`` (residuals
  inside); dropped, it returns its ``hidden_states`` input (a tensor, not a tuple). Gate: forward
  hook ``y <- x + g (y - x)``; cut: :class:`SkipTransformerBlock`.
* Two-stream blocks (SD3, FLUX): ``(encoder_hidden_states, hidden_states)`` in and out, residuals
  inside; dropped, both streams pass unchanged. Gate: ``y <- x + g (y - x)`` on each stream (a
  stream the block returns as None, SD3's last text output, stays None); cut: :class:`SkipJointBlock`.
* ``ResnetBlock2D``: output = ``(shortcut(x) + F(x)) / output_scale_factor``; dropped, the residual
  branch ``F`` goes and the shortcut stays. In down stages the last ResNet has in == out channels
  (shortcut = identity: the block becomes the identity). In up stages every ResNet takes
  ``cat(h, skip)`` and changes the width, so no identity exists; the bypass keeps the block's 1x1
  ``conv_shortcut`` (a few % of the block's MACs), which preserves the skip connection's
  information and the output width. Gate: forward hook ``y <- b + g (y - b)``,
  ``b = shortcut(x) / osf``; cut: :class:`ResidualBypass`.

The gate is per sample, ``g`` (B,), reshaped to the rank of the block's output ((B, 1, 1, 1) for
(B, C, H, W) UNet blocks, (B, 1, 1) for (B, N, C) transformer blocks).

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
from aptp.pruners.granularities.toolkit import HookHandles, expand_gates, get_module, set_module, trace
from aptp.pruners.granularities._modules import ResidualBypass, SkipJointBlock, SkipTransformer, SkipTransformerBlock


@dataclass
class DepthConfig:
    """resnets / transformers: whether the last ResNet / Transformer of each UNet stage is a unit;
    protect: transformer denoisers only -- blocks at each end of ``transformer_blocks`` that are never
    dropped (the others drop middle-out)."""

    resnets: bool = True
    transformers: bool = True
    protect: int = 1

    def __post_init__(self) -> None:
        if not (self.resnets or self.transformers):
            raise ValueError("depth with resnets=False and transformers=False has no units; enable one of them.")
        if self.protect < 0:
            raise ValueError(f"protect={self.protect} must be >= 0 (blocks kept at each end of transformer_blocks).")


def middle_out(n: int, protect: int) -> list[int]:
    """Drop priority of ``n`` stacked blocks: indices ``protect .. n-1-protect``, the middle first,
    then alternating outwards (the earlier block first on ties). ``middle_out(6, 1) == [2, 3, 1, 4]``."""
    inner = range(protect, n - protect)
    mid = (n - 1) / 2
    return sorted(inner, key=lambda i: (abs(i - mid), i))


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


def _per_sample(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gates (B,) -> (B, 1, ..., 1) of ``like``'s rank, so they scale whole samples of any layout."""
    return g.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


def _joint_blocks() -> tuple[type, ...]:
    """Blocks taking and returning ``(encoder_hidden_states, hidden_states)``: SD3's and FLUX's."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock, SkipJointBlock)


#: top-level block lists of transformer denoisers, in the order the model runs them
STACK_NAMES = ("transformer_blocks", "single_transformer_blocks")


def _transformer_stacks(denoiser: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The top-level block lists of a transformer denoiser (DiT's ``transformer_blocks``; FLUX's
    ``transformer_blocks`` and ``single_transformer_blocks``), or [] when it has none of known blocks."""
    from diffusers.models.attention import BasicTransformerBlock

    known = (BasicTransformerBlock, SkipTransformerBlock, *_joint_blocks())
    stacks = [(n, getattr(denoiser, n, None)) for n in STACK_NAMES]
    stacks = [(n, b) for n, b in stacks if isinstance(b, nn.ModuleList) and len(b)]
    if stacks and all(isinstance(b, known) for _, blocks in stacks for b in blocks):
        return stacks
    return []


def stack_order(lengths: list[int], protect: int) -> list[tuple[int, int]]:
    """Drop priority over stacked block lists of ``lengths`` run one after the other: (stack, index)
    pairs middle-out over the whole sequence, without the ``protect`` first and last blocks of each
    stack. One stack: ``middle_out``. ``stack_order([2, 4], 1) == [(1, 1), (1, 2)]``."""
    seq = [(s, i) for s, n in enumerate(lengths) for i in range(n)]
    inner = [k for k, (s, i) in enumerate(seq) if protect <= i < lengths[s] - protect]
    mid = (len(seq) - 1) / 2
    return [seq[k] for k in sorted(inner, key=lambda k: (abs(k - mid), k))]


class Depth(Granularity):
    """Droppable blocks as residual bypasses: the last ResNet / Transformer of each UNet stage, or the
    inner ``transformer_blocks`` of a DiT-style transformer denoiser."""

    config_class = DepthConfig
    kind = "depth"
    order = 3
    group_path = "depth"

    def block_paths(self, denoiser: nn.Module) -> list[str]:
        """Depth units in drop priority (unit 0 drops first)."""
        down, up = getattr(denoiser, "down_blocks", None), getattr(denoiser, "up_blocks", None)
        if down is not None and up is not None and len(down) == len(up):
            return self._unet_paths(denoiser, down, up)
        stacks = _transformer_stacks(denoiser)
        if stacks:
            order = stack_order([len(b) for _, b in stacks], self.config.protect)
            if not order:
                raise ValueError(
                    f"{type(denoiser).__name__} has {' + '.join(f'{len(b)} {n}' for n, b in stacks)} and depth "
                    f"protects protect={self.config.protect} at each end of each, so no block can drop; lower "
                    "depth.protect or drop the 'depth' granularity."
                )
            return [f"{stacks[s][0]}.{i}" for s, i in order]
        raise ValueError(
            f"depth needs a UNet with as many down_blocks as up_blocks, or a transformer denoiser with "
            f"transformer_blocks of BasicTransformerBlock, got {type(denoiser).__name__} (SD3's and FLUX's two-stream "
            "blocks work too); drop the 'depth' granularity for this denoiser."
        )

    def _unet_paths(self, denoiser: nn.Module, down: nn.ModuleList, up: nn.ModuleList) -> list[str]:
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
        joint = _joint_blocks()
        for j, p in enumerate(group.unit_paths):
            m = get_module(denoiser, p)
            if isinstance(m, joint):
                handles.append(m.register_forward_hook(_joint_hook(gates, j, p), with_kwargs=True))
                continue
            resnet = isinstance(m, ResnetBlock2D)

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, j: int = j, resnet: bool = resnet,
                     p: str = p) -> Any:
                g = gates()  # (B_g, U_depth) or None
                if g is None:
                    return None
                y = _block_out(output)  # (B, C, H, W) UNet blocks, (B, N, C) transformer blocks
                x = args[0] if args else kwargs["input_tensor" if resnet else "hidden_states"]
                if resnet:  # b = shortcut(x) / osf, what the bypass computes
                    b = module.conv_shortcut(x) if module.conv_shortcut is not None else x
                    b = b / module.output_scale_factor
                else:
                    b = x
                gj = _per_sample(expand_gates(g, y.shape[0], p)[:, j], y)  # (B, 1, ..., 1)
                return _with_out(output, b + gj * (y - b))

            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        return HookHandles(handles)

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        for j, p in enumerate(group.unit_paths):
            if bool(keep[j]):
                continue
            m = get_module(denoiser, p)
            if isinstance(m, _joint_blocks()):
                set_module(denoiser, p, SkipJointBlock())
            elif isinstance(m, (ResnetBlock2D, ResidualBypass)):
                set_module(denoiser, p, ResidualBypass(m.conv_shortcut, m.output_scale_factor))
            elif isinstance(m, (BasicTransformerBlock, SkipTransformerBlock)):
                set_module(denoiser, p, SkipTransformerBlock())
            else:
                set_module(denoiser, p, SkipTransformer())


def _joint_hook(gates: GateGetter, j: int, path: str):
    """Forward hook of a two-stream block: ``y <- x + g (y - x)`` on ``(encoder_hidden_states,
    hidden_states)``, the order these blocks take (as keywords, or positionally under gradient
    checkpointing) and return."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        g = gates()  # (B_g, U_depth) or None
        if g is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]  # (B, N, C)
        e = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")  # (B, L, C)
        gj = _per_sample(expand_gates(g, h.shape[0], path)[:, j], h)  # (B, 1, 1)
        y_e, y_h = output
        return (None if y_e is None else e + gj * (y_e - e), h + gj * (y_h - h))

    return hook
