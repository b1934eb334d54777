"""Resource counting: the reference MACs counter and per-module shape/MACs records.

Two independent ways to count the multiply-accumulates (MACs) of one denoiser call:

* :func:`flop_counter_macs` -- the *reference*: ``torch.utils.flop_counter.FlopCounterMode``
  (MACs = FLOPs / 2). On CPU, PyTorch's SDPA kernel
  ``aten._scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula; this module registers
  the standard one (``sdpa_flop_count``) so attention matmuls are counted on every device.
* :func:`trace_modules` -- the *analytic* model the unit space is built from: one forward (on the
  ``meta`` device: no memory, no compute) records the input/output shapes of every module, and a
  *MACs formula* per module type gives the MACs of the module's own matmuls (conv:
  ``out.numel() * C_in/groups * kh * kw``; linear: ``rows * in * out``; an attention's ``Q K^T`` and
  ``P V``: the formula its backbone registers, e.g. ``2 * heads * N * M * d`` for diffusers'
  ``Attention`` with M the key length, see :mod:`aptp.backbones.diffusers_base`).
  Both count only matmul-like ops (norms, activations, additions are free), as
  ``FlopCounterMode`` does. This module imports no model library: Conv2d and Linear are built in,
  every other module type is taught by the backbone (or plugin) that uses it.

Extension point: a plugin whose module types do matmuls *outside* ``nn.Linear`` / ``nn.Conv2d``
children (an attention's ``Q K^T`` and ``P V``, an einsum, a functional ``F.linear``) teaches the
tracer about them with :func:`register_macs_formula`::

    def attention_macs(module, args, kwargs, output) -> float:   # the module's own matmuls only,
        b, n, _ = args[0].shape                                  # for the whole batch of this call
        return 2.0 * b * n * n * module.attn_dim                 # Q K^T and P V

    register_macs_formula(timm.layers.Attention, attention_macs)

Formulas are looked up along the module's class hierarchy (a subclass inherits its base's formula
unless it registers its own), when the module has run (so the traced call may register them first);
children are traced and counted separately, so a formula must not count them again. An attention
registers a ``key_len`` too (:func:`attention_types`), recorded per call as ``ModuleRecord.key_len``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


# ------------------------------------------------------------------------------- MACs formulas
#: ``formula(module, args, kwargs, output) -> MACs`` of one call of ``module``'s own matmuls (not its
#: children's), for the whole batch of that call; ``args`` / ``kwargs`` / ``output`` are what the
#: module's forward received and returned (meta tensors while tracing).
MacsFormula = Callable[[nn.Module, tuple, dict, Any], float]
#: ``key_len(module, args, kwargs) -> M``: the key/value length of one call of an attention-like module
#: (the text length for cross-attention), recorded as :attr:`ModuleRecord.key_len`.
KeyLength = Callable[[nn.Module, tuple, dict], int]

_MACS_FORMULAS: dict[type, MacsFormula] = {}
_KEY_LENGTHS: dict[type, KeyLength] = {}


def register_macs_formula(module_type: type, formula: MacsFormula, *, key_len: KeyLength | None = None,
                          mixin: bool = False, replace: bool = False) -> None:
    """Teach the analytic tracer the MACs of ``module_type``'s own matmuls.

    ``formula(module, args, kwargs, output) -> float``: the multiply-accumulates of one call, for
    the whole batch of the call (the tracer divides by the batch). Count only what the module
    computes itself; its ``nn.Linear`` / ``nn.Conv2d`` children have their own formulas. Registering
    a second, different formula for the same type is an error unless ``replace=True``; registering
    the same function again does nothing.

    ``key_len`` marks the type as an *attention* (:func:`attention_types`) and gives the key length M
    of a call (recorded in the trace, e.g. for the MACs per head). ``mixin=True`` accepts a class that
    is no ``nn.Module`` itself but that module types inherit (diffusers' ``AttentionModuleMixin``).
    The backbones register what their models need (:mod:`aptp.backbones.diffusers_base` registers
    diffusers' attentions), so this module knows no model library.
    """
    if not (isinstance(module_type, type) and (mixin or issubclass(module_type, nn.Module))):
        raise TypeError(f"register_macs_formula takes an nn.Module subclass (or a mixin with mixin=True), "
                        f"got {module_type!r}.")
    old = _MACS_FORMULAS.get(module_type)
    if old is not None and old is not formula and not replace:
        raise ValueError(
            f"{module_type.__module__}.{module_type.__qualname__} already has the MACs formula "
            f"{old.__module__}.{old.__qualname__}; pass replace=True to override it with "
            f"{formula.__module__}.{formula.__qualname__}."
        )
    _MACS_FORMULAS[module_type] = formula
    if key_len is not None:
        _KEY_LENGTHS[module_type] = key_len


def macs_formula(module: nn.Module) -> MacsFormula | None:
    """The formula registered for ``type(module)`` or its nearest base class, or None (no own matmuls)."""
    _register_builtin_formulas()
    for cls in type(module).__mro__:
        formula = _MACS_FORMULAS.get(cls)
        if formula is not None:
            return formula
    return None


def key_length(module: nn.Module) -> KeyLength | None:
    """The key-length function registered for ``type(module)`` or a base class (attentions), or None."""
    for cls in type(module).__mro__:
        fn = _KEY_LENGTHS.get(cls)
        if fn is not None:
            return fn
    return None


def attention_types() -> tuple[type, ...]:
    """The module types registered as attentions (with a ``key_len``), e.g. diffusers' ``Attention``
    once a diffusers backbone has registered them."""
    return tuple(_KEY_LENGTHS)




def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _conv2d_macs(module: nn.Conv2d, args: tuple, kwargs: dict, output: Any) -> float:
    kh, kw = module.kernel_size
    return float(_numel(_shape(output))) * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, args: tuple, kwargs: dict, output: Any) -> float:
    x = args[0] if args else kwargs["input"]
    return float(_numel(_shape(x)[:-1])) * module.in_features * module.out_features


def _register_builtin_formulas() -> None:
    """Conv2d and Linear (model libraries' module types are registered by the backbones)."""
    if nn.Linear in _MACS_FORMULAS:
        return
    register_macs_formula(nn.Conv2d, _conv2d_macs)
    register_macs_formula(nn.Linear, _linear_macs)


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
            # looked up when the module has run: the traced call may register formulas first
            formula, key_len_of = macs_formula(module), key_length(module)
            x = a[0] if a else kw.get("hidden_states")
            inp = _shape(x)
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            rec = trace.records.setdefault(path, ModuleRecord(type(module).__name__))
            key_len = int(key_len_of(module, a, kw)) if key_len_of is not None else 0
            if rec.calls == 0:
                rec.input_shape, rec.output_shape, rec.key_len = inp, _shape(out), key_len
            rec.calls += 1
            if formula is not None:
                rec.macs += float(formula(module, a, kw, output)) / max(inp[0] if inp else batch, 1)

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
