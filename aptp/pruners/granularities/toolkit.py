"""The unit-space toolkit: what a granularity needs to gate and cut its units, for aptp's built-in
granularities and for plugins alike (this module is public; its ``__all__`` is the API).

* hooks -- :class:`HookHandles` (what ``Granularity.attach`` returns), :func:`expand_gates` and
  :func:`units_to_channels` (unit gates -> per-sample channel gates);
* cuts -- :func:`get_module` / :func:`set_module` (replace a submodule, also inside a
  ``nn.ModuleList``), :func:`channel_index` (kept units -> kept channels), :func:`slice_linear`,
  :func:`slice_conv` (dense weights copied, then sliced; nothing is re-initialised);
* MACs -- :func:`trace` (per-sample shapes and analytic MACs of every module, one forward on the
  ``meta`` device; the denoiser called as its backbone calls it, ``Conditioning.call``),
  :func:`dummy_inputs` and :func:`default_call` (the call for a bare diffusers denoiser).

Conventions:

* a gate getter returns the gates of one unit group, ``(B_g, n)`` (or ``(n,)``), or ``None`` for an
  ungated (dense) forward;
* activations have the batch first, ``(B, ...)``; gates broadcast when ``B % B_g == 0`` by tiling
  (``g.repeat(B // B_g, 1)``: under classifier-free guidance diffusers calls the denoiser on
  ``cat([uncond, cond])``, so sample ``i`` of every chunk takes gate row ``i``);
* a unit of a width is a contiguous run of ``group_size`` channels (unit ``j``: channels
  ``[j s, (j+1) s)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aptp.core.errors import ShapeError
from aptp.core.interfaces import Conditioning
from aptp.core.resources import Trace, on_meta, trace_modules

__all__ = [
    "HookHandles",
    "channel_index",
    "default_call",
    "dummy_inputs",
    "expand_gates",
    "get_module",
    "set_module",
    "slice_conv",
    "slice_linear",
    "trace",
    "units_to_channels",
]


class HookHandles:
    """Several hook handles that remove together (what ``Granularity.attach`` returns)."""

    def __init__(self, handles: list[Any] | None = None) -> None:
        self.handles = list(handles or [])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``""`` = ``root`` itself)."""
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (works inside ``nn.ModuleList``: ``a.b.0``)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def expand_gates(g: torch.Tensor, batch: int, where: str) -> torch.Tensor:
    """Gates (B_g, n) or (n,) -> (batch, n), tiling when ``batch`` is a multiple of ``B_g``."""
    if g.dim() == 1:
        g = g.unsqueeze(0)
    b_g = g.shape[0]
    if b_g == batch:
        return g
    if batch % b_g == 0:
        return g.repeat(batch // b_g, 1)
    raise ShapeError(
        f"gates for {where} have batch {b_g}, but the activations have batch {batch}; pass one gate row "
        f"per sample, or a number of rows that divides {batch} (rows are tiled, e.g. for CFG)."
    )


def units_to_channels(g: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, n) unit gates -> (B, n * group_size) channel gates (each unit covers a contiguous run)."""
    return g.repeat_interleave(group_size, dim=-1)


def channel_index(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the channels of the kept units: keep (n,) bool -> (k * group_size,) long."""
    units = torch.nonzero(keep.to(torch.bool).cpu(), as_tuple=False).flatten()
    offs = torch.arange(group_size)
    return (units[:, None] * group_size + offs[None, :]).flatten()


def _slice_weight(module: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None,
                  out_attr: str, in_attr: str) -> None:
    """Keep output rows ``out`` (weight dim 0 and the bias) and/or inputs ``inp`` (weight dim 1) of
    ``module`` in place, updating its ``out_attr`` / ``in_attr`` sizes (weights copied, never re-initialised)."""
    w = module.weight
    if out is not None:
        w = w[out.to(w.device)]
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[out.to(w.device)].clone(), module.bias.requires_grad)
        setattr(module, out_attr, int(out.numel()))
    if inp is not None:
        w = w[:, inp.to(w.device)]
        setattr(module, in_attr, int(inp.numel()))
    module.weight = nn.Parameter(w.clone(), module.weight.requires_grad)


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and/or input ``cols`` of ``lin`` in place (weights copied, never re-initialised)."""
    _slice_weight(lin, rows, cols, "out_features", "in_features")


def slice_conv(conv: nn.Conv2d, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> None:
    """Keep output channels ``out`` and/or input channels ``inp`` of ``conv`` in place (groups == 1)."""
    if conv.groups != 1:
        raise ValueError(f"cannot slice grouped convolution {conv} (groups={conv.groups}); only groups=1 is supported.")
    _slice_weight(conv, out, inp, "out_channels", "in_channels")


def dummy_inputs(conditioning: Conditioning, batch: int = 1, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero sample (B, C, H, W), timestep (B,) and text states (B, L, D) of the right shapes."""
    c, h, w = conditioning.sample_shape
    sample = torch.zeros(batch, c, h, w, device=device, dtype=dtype)
    t = torch.full((batch,), 10, device=device, dtype=torch.long)
    text = torch.zeros(batch, conditioning.text_len, conditioning.text_dim, device=device, dtype=dtype)
    return sample, t, text


def default_call(denoiser: nn.Module, sample: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> Any:
    """How :func:`trace` calls a denoiser whose conditioning carries no backbone call (a bare
    diffusers model): :func:`aptp.backbones.diffusers_base.diffusers_call`, the diffusers UNet or
    DiT / PixArt convention. A backbone's conditioning carries its own call
    (:meth:`~aptp.core.interfaces.Backbone.trace_call`)."""
    from aptp.backbones.diffusers_base import diffusers_call

    return diffusers_call(denoiser, sample, t, text)


_TRACE_CACHE: dict[tuple, Trace] = {}


def _signature(denoiser: nn.Module, conditioning: Conditioning, call: Callable[..., Any]) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in denoiser.named_parameters())
    return (id(denoiser), hash(shapes), hash(tuple(type(m).__name__ for m in denoiser.modules())), conditioning,
            getattr(call, "__func__", call), id(getattr(call, "__self__", None)))


def trace(denoiser: nn.Module, conditioning: Conditioning,
          call: Callable[..., Any] | None = None) -> Trace:
    """Per-sample shapes and analytic MACs of every module, from one forward on the meta device.

    The denoiser is called as ``call(denoiser, sample, t, text)``: ``call`` when given, else the
    backbone's call the conditioning carries (``conditioning.call``, :meth:`Backbone.trace_call`),
    else :func:`default_call`. Cached per (model, layout, conditioning, call); the model's real
    weights are not touched.
    """
    call = call if call is not None else (conditioning.call if conditioning.call is not None else default_call)
    key = _signature(denoiser, conditioning, call)
    hit = _TRACE_CACHE.get(key)
    if hit is not None:
        return hit
    inputs = dummy_inputs(conditioning, 1, device="meta", dtype=next(denoiser.parameters()).dtype)
    with on_meta(denoiser) as model:
        result = trace_modules(_Call(model, call), *inputs)
    # drop the "model." prefix added by the _Call wrapper
    result.records = {k[len("model."):] if k.startswith("model.") else ("" if k == "model" else k): v
                      for k, v in result.records.items() if k != ""}
    if len(_TRACE_CACHE) > 16:
        _TRACE_CACHE.clear()
    _TRACE_CACHE[key] = result
    return result


class _Call(nn.Module):
    """Wraps ``call(model, *inputs)`` as a module so it can be traced."""

    def __init__(self, model: nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self._call(self.model, *inputs)

