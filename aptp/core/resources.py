"""Resource counting: the reference MACs counter and per-module shape/MACs records.

Two independent ways to count the multiply-accumulates (MACs) of one denoiser call:

* :func:`flop_counter_macs` -- the *reference*: ``torch.utils.flop_counter.FlopCounterMode``
  (MACs = FLOPs / 2). On CPU, PyTorch's SDPA kernel
  ``aten._scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula; this module registers
  the standard one (``sdpa_flop_count``) so attention matmuls are counted on every device.
* :func:`trace_modules` + :func:`module_macs` -- the *analytic* model the unit space is built
  from: one forward (on the ``meta`` device: no memory, no compute) records the input/output shapes
  of every ``nn.Conv2d``, ``nn.Linear`` and diffusers ``Attention``; MACs then follow from closed
  formulas (conv: ``out.numel() * C_in/groups * kh * kw``; linear: ``rows * in * out``;
  attention: ``2 * heads * N * M * d`` with M the key length, i.e. the text length for
  cross-attention). Both count only matmul-like ops (norms, activations, additions are free), as
  ``FlopCounterMode`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

aten = torch.ops.aten

# ------------------------------------------------------------------------------- reference counter
_CPU_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu",)


def _register_cpu_sdpa_formula() -> None:
    """Give SDPA's CPU kernel the same FLOP formula as the CUDA kernels (idempotent)."""
    for name in _CPU_SDPA_OPS:
        op = getattr(aten, name, None)
        if op is None or op in flop_counter.flop_registry:
            continue

        def _formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        flop_counter.register_flop_formula(op)(_formula)


def flop_counter_macs(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of ``model(*args, **kwargs)`` for the whole batch, counted by ``FlopCounterMode``.

    Runs the forward under ``torch.no_grad``; works for real tensors and on the ``meta`` device.
    """
    _register_cpu_sdpa_formula()
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    flops = counter.get_total_flops()
    return int(flops) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------- analytic records
@dataclass
class ModuleRecord:
    """Shapes one module saw in a traced forward (the first call when a module runs twice)."""

    type: str
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    key_len: int = 0  # Attention: M, the key/value length (text length for cross-attention)
    calls: int = 0
    macs: float = 0.0  # MACs of this module's own matmuls for one sample, summed over its calls


@dataclass
class Trace:
    """Per-sample records of every module of a denoiser (keys are ``named_modules`` paths)."""

    records: dict[str, ModuleRecord] = field(default_factory=dict)

    def macs(self, path: str) -> float:
        """Per-sample MACs of module ``path`` itself (0 for modules that are no matmul leaves)."""
        rec = self.records.get(path)
        return rec.macs if rec is not None else 0.0

    def macs_under(self, prefix: str) -> float:
        """Per-sample MACs of every counted module at or below ``prefix``."""
        dot = prefix + "."
        return sum(r.macs for p, r in self.records.items() if p == prefix or p.startswith(dot))

    @property
    def total_macs(self) -> float:
        return sum(r.macs for r in self.records.values())


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)


def _leaf_macs(module: nn.Module, inp: tuple[int, ...], out: tuple[int, ...], key_len: int) -> float:
    """Analytic MACs of one call of a matmul leaf, for the whole batch of that call."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        n = 1
        for s in out:
            n *= s
        return float(n) * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        rows = 1
        for s in inp[:-1]:
            rows *= s
        return float(rows) * module.in_features * module.out_features
    if _is_attention(module):  # the two attention matmuls: Q K^T and P V
        b, n = inp[0], (inp[1] if len(inp) == 3 else inp[2] * inp[3])
        inner = module.to_q.out_features
        return 2.0 * b * n * key_len * inner  # = 2 * B * heads * N * M * d
    return 0.0


def trace_modules(model: nn.Module, *args: Any, **kwargs: Any) -> Trace:
    """Run ``model(*args, **kwargs)`` once and record shapes and analytic MACs per module.

    MACs are divided by the batch size of the traced call (pass batch 1 for clarity). Use meta
    tensors (see :func:`meta_call`) to trace an SD-sized model in a fraction of a second.
    """
    trace = Trace()
    batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    handles = []

    def hook(path: str):
        def _hook(module: nn.Module, a: tuple, kw: dict, output: Any) -> None:
            x = a[0] if a else kw.get("hidden_states")
            inp = _shape(x)
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            rec = trace.records.setdefault(path, ModuleRecord(type(module).__name__))
            key_len = 0
            if _is_attention(module):
                enc = kw.get("encoder_hidden_states", a[1] if len(a) > 1 else None)
                key_len = enc.shape[1] if isinstance(enc, torch.Tensor) else (inp[1] if len(inp) == 3 else inp[2] * inp[3])
            if rec.calls == 0:
                rec.input_shape, rec.output_shape, rec.key_len = inp, _shape(out), key_len
            rec.calls += 1
            rec.macs += _leaf_macs(module, inp, _shape(out), key_len) / max(inp[0] if inp else batch, 1)

        return _hook

    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace


@contextlib.contextmanager
def on_meta(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every parameter and buffer of ``model`` for a ``meta`` twin (shapes only).

    Lets a forward of an SD-sized model on real weights be traced without touching its memory.
    """
    saved: list[tuple[nn.Module, str, Any, bool]] = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                saved.append((module, name, p, True))
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                saved.append((module, name, b, False))
                module._buffers[name] = torch.empty_like(b, device="meta")
    try:
        yield model
    finally:
        for module, name, t, is_param in saved:
            (module._parameters if is_param else module._buffers)[name] = t
