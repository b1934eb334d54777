"""MACs of timm module types that aptp's analytic tracer cannot see through their children.

aptp's tracer (:func:`aptp.core.resources.trace_modules`) counts every ``nn.Linear`` / ``nn.Conv2d``
child; timm's fused-qkv :class:`timm.layers.Attention` also does two matmuls of its own, ``Q K^T``
and ``P V`` (through ``F.scaled_dot_product_attention`` or explicit ``@``), which this module
registers with :func:`aptp.core.resources.register_macs_formula` on import. ``aptp_timm.model`` and
``aptp_timm.granularities`` import it, so any trace of a model made of timm blocks counts them.
"""

from __future__ import annotations

from typing import Any

from timm.layers import Attention
from torch import nn

from aptp.core.resources import register_macs_formula


def attention_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> float:
    """timm ``Attention`` on ``x`` (B, N, C): ``Q K^T`` and ``P V`` over N tokens,
    ``2 B N^2 attn_dim`` = ``2 B heads N^2 head_dim`` MACs (``attn_dim`` shrinks as heads are cut)."""
    x = args[0] if args else kwargs["x"]  # (B, N, C)
    b, n = int(x.shape[0]), int(x.shape[1])
    return 2.0 * b * n * n * module.attn_dim


register_macs_formula(Attention, attention_macs)
