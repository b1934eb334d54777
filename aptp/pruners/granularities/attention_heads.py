"""Attention heads: whole heads of every diffusers ``Attention`` (self- and cross-attention are
separate unit groups, ``meta['attention']`` says which).

Unit ``j`` of an ``Attention`` with ``h`` heads of width ``d`` is head ``j``: rows
``[j d, (j+1) d)`` of ``to_q``, ``to_k``, ``to_v`` and the same columns of ``to_out[0]``. Whole heads
are cut because diffusers' ``AttnProcessor2_0`` ignores ``attn.scale`` (cutting head *dimensions*
would change the softmax temperature).

* gate: a forward pre-hook on ``to_out[0]`` multiplies its input, the concatenated head outputs
  (B, N, h d), by ``g`` (B, h) expanded per head;
* cut: the rows/columns above and ``attn.heads`` / ``inner_dim`` / ``inner_kv_dim``; an attention
  that loses every head becomes :class:`~aptp.pruners.granularities._modules.NoHeadAttention`
  (``to_out[0]``'s bias, plus -- unused -- any parameters no head owns, e.g. qk norms, so the cut
  model's parameter count stays ``UnitSpace.kept_params``);
* MACs per head: ``(MACs(to_q, to_k, to_v, to_out[0]) + 2 N M h d) / h`` with N the query length and
  M the key length (the text length for cross-attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aptp.core.interfaces import Conditioning, GateGetter, Granularity, UnitChannels
from aptp.core.units import UnitGroup
from aptp.pruners.granularities._common import (
    HookHandles,
    channel_index,
    expand_gates,
    get_module,
    set_module,
    slice_linear,
    trace,
    units_to_channels,
)
from aptp.pruners.granularities._modules import NoHeadAttention


@dataclass
class AttentionHeadsConfig:
    """Which attentions to prune: 'both', 'self' or 'cross'."""

    which: str = "both"

    def __post_init__(self) -> None:
        if self.which not in ("both", "self", "cross"):
            raise ValueError(f"which={self.which!r} is not one of 'both', 'self', 'cross'; pick one of them.")


def _attentions(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(p, m) for p, m in denoiser.named_modules() if isinstance(m, Attention)]


def _head_dim(attn: nn.Module) -> int:
    q, k = attn.to_q.out_features, attn.to_k.out_features
    if q != k or q % attn.heads:
        raise ValueError(
            f"attention heads can only be cut where to_q and to_k have the same width divisible by heads "
            f"(got to_q={q}, to_k={k}, heads={attn.heads}); drop 'attention_heads' for this model."
        )
    return q // attn.heads


class AttentionHeads(Granularity):
    """Whole attention heads (self- and cross-attention separately; gate before ``to_out[0]``)."""

    config_class = AttentionHeadsConfig
    kind = "attention_heads"

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        groups = []
        for path, a in _attentions(denoiser):
            which = "cross" if a.is_cross_attention else "self"
            if self.config.which not in ("both", which):
                continue
            if getattr(a, "add_k_proj", None) is not None:
                raise ValueError(f"{path}: attention with added key/value projections is not supported.")
            h, d = a.heads, _head_dim(a)
            macs = sum(tr.macs(f"{path}.{n}") for n in ("to_q", "to_k", "to_v", "to_out.0")) + tr.macs(path)
            params = sum(d * (lin.in_features + (1 if lin.bias is not None else 0)) for lin in (a.to_q, a.to_k, a.to_v))
            params += d * a.to_out[0].out_features
            rec = tr.records.get(path)
            groups.append(UnitGroup(self.kind, path, h, macs / h, params,
                                    meta={"attention": which, "head_dim": d,
                                          "key_len": rec.key_len if rec else 0}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(h,) L2 norm of each head's rows of to_q/k/v and columns of to_out[0]."""
        a = get_module(denoiser, group.path)
        sq = sum(lin.weight.detach().float().pow(2).sum(1) for lin in (a.to_q, a.to_k, a.to_v))  # (h d,)
        sq = sq + a.to_out[0].weight.detach().float().pow(2).sum(0)
        return sq.view(group.num_units, -1).sum(1).sqrt().cpu()

    def unit_channels(self, denoiser: nn.Module, group: UnitGroup) -> UnitChannels:
        """``to_out[0]``'s input channels, one head (``d`` channels) per unit (the gate's place)."""
        a = get_module(denoiser, group.path)
        return UnitChannels(a.to_out[0], _head_dim(a))

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        a = get_module(denoiser, group.path)
        d = _head_dim(a)

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            g = gates()  # (B_g, h) or None
            if g is None:
                return None
            x = args[0]  # (B, N, h d)
            cg = units_to_channels(expand_gates(g, x.shape[0], group.path), d)  # (B, h d)
            return (x * cg.to(device=x.device, dtype=x.dtype).unsqueeze(1), *args[1:])

        return HookHandles([a.to_out[0].register_forward_pre_hook(pre_hook)])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        a = get_module(denoiser, group.path)
        d = _head_dim(a)
        keep = keep.to(torch.bool)
        out = a.to_out[0]
        if not bool(keep.any()):  # width zero: keeps what no head owns (to_out[0]'s bias, qk norms, ...)
            shared = {n: m for n, m in a.named_children()
                      if n not in ("to_q", "to_k", "to_v", "to_out") and any(True for _ in m.parameters())}
            set_module(denoiser, group.path, NoHeadAttention(out.out_features, out.bias, a.residual_connection,
                                                             a.rescale_output_factor, keep=shared))
            return
        idx = channel_index(keep, d)  # (k d,)
        for lin in (a.to_q, a.to_k, a.to_v):
            slice_linear(lin, rows=idx)
        slice_linear(out, cols=idx)
        a.heads = int(keep.sum())
        a.inner_dim = a.inner_kv_dim = int(idx.numel())
