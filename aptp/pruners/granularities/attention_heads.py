"""Attention heads: whole heads of every diffusers ``Attention`` (self-, cross- and joint attention
are separate unit groups, ``meta['attention']`` says which: 'self', 'cross' or 'joint').

Unit ``j`` of an ``Attention`` with ``h`` heads of width ``d`` is head ``j``: rows
``[j d, (j+1) d)`` of every projection that produces it (``to_q``, ``to_k``, ``to_v``; joint attention
-- SD3's ``JointTransformerBlock``, FLUX's ``FluxAttention`` -- also the text stream's ``add_q_proj``,
``add_k_proj``, ``add_v_proj``) and the same columns of every layer that consumes it (``to_out[0]``;
joint attention also ``to_add_out``; FLUX's single blocks, whose attention has no output projection,
the first ``h d`` input columns of the block's fused ``proj_out``). Both streams of a joint attention
lose the same heads: the image and text tokens attend in one softmax. Whole heads are cut because
diffusers' processors ignore ``attn.scale`` changes (cutting head *dimensions* would change the
softmax temperature).

* gate: a forward pre-hook on every consumer multiplies the head columns of its input, the
  concatenated head outputs (B, N, h d), by ``g`` (B, h) expanded per head;
* cut: the rows/columns above and ``attn.heads`` / ``inner_dim`` / ``inner_kv_dim``; an attention
  that loses every head becomes :class:`~aptp.pruners.granularities._modules.NoHeadAttention`
  (``to_out[0]``'s / ``to_add_out``'s bias, plus -- unused -- any parameters no head owns, e.g. qk
  norms, so the cut model's parameter count stays ``UnitSpace.kept_params``);
* MACs per head: ``(MACs(producers) + MACs(consumers) + 2 N M h d) / h`` with N the query length and
  M the key length (the text length for cross-attention, image + text tokens for joint attention);
  a fused ``proj_out`` counts for the share of its input columns that the heads own.

With ``min_kept_heads`` an architecture keeping fewer heads than that in an attention keeps none
(``UnitGroup.min_kept``, applied by the gate, the cut and the MACs / parameter / latency counts).
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
    set_module,
    slice_linear,
    trace,
    units_to_channels,
)
from aptp.pruners.granularities._modules import NoHeadAttention


@dataclass
class AttentionHeadsConfig:
    """Which attentions to prune: 'both' (every attention), 'self', 'cross' or 'joint' (SD3 / FLUX
    two-stream attentions)."""

    which: str = "both"
    min_kept_heads: int = 0  # an attention keeping fewer heads keeps none (0: no minimum)

    def __post_init__(self) -> None:
        if self.which not in ("both", "self", "cross", "joint"):
            raise ValueError(f"which={self.which!r} is not one of 'both', 'self', 'cross', 'joint'; pick one of them.")
        if self.min_kept_heads < 0:
            raise ValueError(f"min_kept_heads={self.min_kept_heads} must be >= 0 (0: no minimum).")


def _attentions(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    from aptp.core.resources import attention_types

    return [(p, m) for p, m in denoiser.named_modules() if isinstance(m, attention_types())]


def _head_dim(attn: nn.Module) -> int:
    q, k = attn.to_q.out_features, attn.to_k.out_features
    if q != k or q % attn.heads:
        raise ValueError(
            f"attention heads can only be cut where to_q and to_k have the same width divisible by heads "
            f"(got to_q={q}, to_k={k}, heads={attn.heads}); drop 'attention_heads' for this model."
        )
    return q // attn.heads


@dataclass
class _Heads:
    """Where the heads of one attention live: the layers producing them (rows) and consuming them
    (input columns ``[offset, offset + h d)``)."""

    attention: str  # 'self' | 'cross' | 'joint'
    head_dim: int  # d
    producers: list[nn.Linear]
    consumers: list[tuple[nn.Linear, int]]  # (layer, first column of the heads)


def _heads(denoiser: nn.Module, path: str, a: nn.Module) -> _Heads:
    if getattr(a, "fused_projections", False) or getattr(a, "to_qkv", None) is not None:
        raise ValueError(f"{path}: fused q/k/v projections cannot be cut per head; unfuse them "
                         "(model.unfuse_qkv_projections()) before pruning.")
    producers = [a.to_q, a.to_k, a.to_v]
    joint = getattr(a, "add_q_proj", None) is not None
    if joint:
        producers += [a.add_q_proj, a.add_k_proj, a.add_v_proj]
    elif getattr(a, "add_k_proj", None) is not None:
        raise ValueError(f"{path}: attention with added key/value projections but no added query is not supported.")
    consumers: list[tuple[nn.Linear, int]] = []
    if getattr(a, "to_out", None) is not None:
        consumers.append((a.to_out[0], 0))
    else:  # FLUX single block: the attention output is the first h d input columns of the block's proj_out
        parent = get_module(denoiser, path.rpartition(".")[0])
        if not isinstance(getattr(parent, "proj_out", None), nn.Linear):
            raise ValueError(f"{path}: attention without to_out whose block has no proj_out; its heads cannot be cut.")
        consumers.append((parent.proj_out, 0))
    if getattr(a, "to_add_out", None) is not None:
        consumers.append((a.to_add_out, 0))
    which = "joint" if joint else ("cross" if getattr(a, "is_cross_attention", False) else "self")
    return _Heads(which, _head_dim(a), producers, consumers)


def _own_output(a: nn.Module, lin: nn.Module) -> bool:
    """Whether ``lin`` is an output projection of attention ``a`` itself (not a fused block layer)."""
    out = getattr(a, "to_out", None)
    return (out is not None and lin is out[0]) or lin is getattr(a, "to_add_out", None)


def _scale_columns(x: torch.Tensor, cg: torch.Tensor, offset: int) -> torch.Tensor:
    """x (B, N, F) with columns ``[offset, offset + W)`` multiplied by cg (B, W)."""
    cg = cg.to(device=x.device, dtype=x.dtype).unsqueeze(1)  # (B, 1, W)
    w = cg.shape[-1]
    if offset == 0 and w == x.shape[-1]:
        return x * cg
    return torch.cat([x[..., :offset], x[..., offset:offset + w] * cg, x[..., offset + w:]], dim=-1)


class AttentionHeads(Granularity):
    """Whole attention heads (self-, cross- and joint attention separately; gate before the output projections)."""

    config_class = AttentionHeadsConfig
    kind = "attention_heads"
    order = 1

    def unit_groups(self, denoiser: nn.Module, conditioning: Conditioning) -> list[UnitGroup]:
        tr = trace(denoiser, conditioning)
        names = {id(m): n for n, m in denoiser.named_modules()}
        groups = []
        for path, a in _attentions(denoiser):
            lay = _heads(denoiser, path, a)
            if self.config.which not in ("both", lay.attention):
                continue
            h, d = a.heads, lay.head_dim
            macs = sum(tr.macs(names[id(lin)]) for lin in lay.producers) + tr.macs(path)
            macs += sum(tr.macs(names[id(lin)]) * h * d / lin.in_features for lin, _ in lay.consumers)
            params = sum(d * (lin.in_features + (1 if lin.bias is not None else 0)) for lin in lay.producers)
            params += sum(d * lin.out_features for lin, _ in lay.consumers)
            rec = tr.records.get(path)
            groups.append(UnitGroup(self.kind, path, h, macs / h, params, min_kept=self.config.min_kept_heads,
                                    meta={"attention": lay.attention, "head_dim": d,
                                          "key_len": rec.key_len if rec else 0}))
        return groups

    def unit_magnitude(self, denoiser: nn.Module, group: UnitGroup) -> torch.Tensor:
        """(h,) L2 norm of each head's rows of its producers (to_q/k/v, add_*) and columns of its consumers."""
        a = get_module(denoiser, group.path)
        lay = _heads(denoiser, group.path, a)
        hd = group.num_units * lay.head_dim
        sq = sum(lin.weight.detach().float().pow(2).sum(1) for lin in lay.producers)  # (h d,)
        for lin, off in lay.consumers:
            sq = sq + lin.weight.detach().float()[:, off:off + hd].pow(2).sum(0)
        return sq.view(group.num_units, -1).sum(1).sqrt().cpu()

    def unit_channels(self, denoiser: nn.Module, group: UnitGroup) -> UnitChannels:
        """``to_out[0]``'s input channels, one head (``d`` channels) per unit (the gate's place).
        Joint attention and FLUX's fused single blocks (several producers / consumers) are refused."""
        a = get_module(denoiser, group.path)
        lay = _heads(denoiser, group.path, a)
        if len(lay.producers) != 3 or len(lay.consumers) != 1 or not _own_output(a, lay.consumers[0][0]):
            raise NotImplementedError(f"{group.path}: {lay.attention} attention heads are produced / consumed by several "
                                      "layers; cut them with aptp's own cut (cut_backend: aptp), not a channel pruner.")
        return UnitChannels(a.to_out[0], lay.head_dim)

    def attach(self, denoiser: nn.Module, group: UnitGroup, gates: GateGetter) -> HookHandles:
        a = get_module(denoiser, group.path)
        lay = _heads(denoiser, group.path, a)
        d = lay.head_dim

        def hook_at(offset: int):
            def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
                g = gates()  # (B_g, h) or None
                if g is None:
                    return None
                g = group.normalise(g)  # the minimum kept heads, as the cut applies it
                x = args[0]  # (B, N, h d); a fused proj_out: (B, N, h d + F)
                cg = units_to_channels(expand_gates(g, x.shape[0], group.path), d)  # (B, h d)
                return (_scale_columns(x, cg, offset), *args[1:])

            return pre_hook

        return HookHandles([lin.register_forward_pre_hook(hook_at(off)) for lin, off in lay.consumers])

    def cut(self, denoiser: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        a = get_module(denoiser, group.path)
        lay = _heads(denoiser, group.path, a)
        d, hd = lay.head_dim, a.heads * lay.head_dim
        keep = group.normalise(keep.to(torch.bool))  # fewer than min_kept heads: none
        idx = channel_index(keep, d)  # (k d,)
        for lin, off in lay.consumers:
            if not _own_output(a, lin):  # a fused block proj_out: the cut heads' columns go, the others stay
                rest = torch.arange(off + hd, lin.in_features)
                slice_linear(lin, cols=torch.cat([torch.arange(off), off + idx, rest]))
        if not bool(keep.any()):  # width zero: keeps what no head owns (output biases, qk norms, ...)
            owned = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
            shared = {n: m for n, m in a.named_children() if n not in owned and any(True for _ in m.parameters())}
            out = a.to_out[0] if getattr(a, "to_out", None) is not None else None
            ctx = getattr(a, "to_add_out", None)
            set_module(denoiser, group.path, NoHeadAttention(
                out.out_features if out is not None else 0, out.bias if out is not None else None,
                getattr(a, "residual_connection", False), getattr(a, "rescale_output_factor", 1.0), keep=shared,
                context_dim=(ctx.out_features if ctx is not None else 0) if lay.attention == "joint" else None,
                context_bias=ctx.bias if ctx is not None else None))
            return
        for lin in lay.producers:
            slice_linear(lin, rows=idx)
        for lin, _ in lay.consumers:
            if _own_output(a, lin):
                slice_linear(lin, cols=idx)
        a.heads = int(keep.sum())
        a.inner_dim = int(idx.numel())
        if hasattr(a, "inner_kv_dim"):
            a.inner_kv_dim = int(idx.numel())
