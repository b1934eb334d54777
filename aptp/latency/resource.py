"""What the pruners budget: ``resource: macs`` (the paper's, the default) or ``resource: latency``.

    pruner:
      resource: latency             # target_ratio is a fraction of the dense model's latency
      target_ratio: 0.6             # or target_ms: 15.0 (ms; converted with the model's dense latency)
      latency_model: {name: profiled, device: cpu, batch_size: 1}   # a registered latency model

* APTP: the resource loss ``|log(mean r / p)|`` and the spread terms take ``r`` from
  :func:`resource_ratio`, the predicted latency ratio of each sample's gates (differentiable) instead
  of its kept-MACs ratio;
* static: :func:`latency_budget` asks the assignment for an architecture on the latency-priced unit
  space (units chosen by importance per millisecond) and corrects the ratio it asks for until the
  exact predicted latency ratio is at most the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import OmegaConf

from aptp.core.errors import ConfigError, did_you_mean
from aptp.core.units import UnitSpace
from aptp.latency.base import LatencyContext, LatencyModel

RESOURCES = ("macs", "latency")
DEFAULT_LATENCY_MODEL = "profiled"


def check_resource(resource: str, latency_model: Any = None, target_ms: float | None = None) -> str:
    """``resource`` if it is one the pruners budget, else a ValueError saying which exist; and
    ``target_ms`` (a latency target in milliseconds) only with ``resource: latency``."""
    if resource not in RESOURCES:
        raise ValueError(f"resource={resource!r} must be 'macs' or 'latency' (a fraction of the dense "
                         "model's measured latency, see latency_model).")
    if target_ms is not None:
        if resource != "latency":
            raise ValueError(f"target_ms={target_ms} needs resource: latency (and a latency_model to convert it); "
                             f"with resource: {resource} give target_ratio instead.")
        if not target_ms > 0:
            raise ValueError(f"target_ms={target_ms} must be > 0 (milliseconds per denoiser call).")
    if latency_model is not None:
        if not isinstance(latency_model, Mapping) or not isinstance(latency_model.get("name"), str):
            raise ValueError(f"latency_model={latency_model!r} must be a mapping with a 'name' (a registered "
                             f"latency model, e.g. {{name: {DEFAULT_LATENCY_MODEL}}}) and its parameters.")
    return resource


def build_latency_model(section: Mapping[str, Any] | None = None, registry=None) -> LatencyModel:
    """The latency model a pruner's ``latency_model`` section names (None: ``profiled``, defaults)."""
    from aptp.core.config import instantiate_config
    from aptp.core.plugins import default_registry

    registry = registry or default_registry()
    params = dict(OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else (section or {}))
    name = str(params.pop("name", DEFAULT_LATENCY_MODEL))
    spec = registry["latency_model"].get(name)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    for key in params:
        if key not in fields:
            raise ConfigError(f"latency_model '{name}' has no parameter '{key}'.{did_you_mean(str(key), fields)} "
                              f"Its parameters: {', '.join(sorted(fields)) or 'none'}.")
    return spec.build(instantiate_config(spec, params))


def fit_latency_model(section: Mapping[str, Any] | None, ctx) -> LatencyModel:
    """Build and fit the latency model of ``section`` on a :class:`~aptp.pruners.training.TrainContext`'s
    dense denoiser (gates off). Distributed: the main process measures first, the others then load
    its table from the shared cache, so every process predicts the same latencies."""
    model = build_latency_model(section, ctx.composition.registry)
    ctx.gates.clear()
    context = LatencyContext(ctx.denoiser, ctx.unit_space, ctx.granularities, ctx.conditioning, ctx.backbone.denoise)
    if ctx.is_main:
        model.fit(context)
    ctx.barrier()
    if not ctx.is_main:
        model.fit(context)
    ctx.log(f"latency model '{section.get('name', DEFAULT_LATENCY_MODEL) if section else DEFAULT_LATENCY_MODEL}': "
            f"dense denoiser {model.dense_ms:.3f} ms")
    return model


def resource_ratio(resource: str, latency_model: Mapping[str, Any] | None, ctx) -> Callable[[torch.Tensor], torch.Tensor]:
    """``arch (..., U) -> (...)``: the kept-MACs ratio (``macs``: exactly ``UnitSpace.macs_ratio``)
    or the predicted latency ratio (``latency``), differentiable in the gates."""
    if check_resource(resource, latency_model) == "macs":
        return ctx.unit_space.macs_ratio
    return fit_latency_model(latency_model, ctx).latency_ratio


def resolve_target_ratio(config: Any, latency: Any = None) -> float:
    """The ratio target of a pruner ``config``: its ``target_ratio``, or, when it gives ``target_ms``,
    ``target_ms`` over the fitted latency model's dense prediction (``latency``: the model or its
    ``latency_ratio``, as :func:`resource_ratio` returns it). A ConfigError when that exceeds 1."""
    ms = getattr(config, "target_ms", None)
    if ms is None:
        return float(config.target_ratio)
    model = getattr(latency, "__self__", latency)
    if not isinstance(model, LatencyModel):
        raise ConfigError(f"target_ms={ms} needs resource: latency and a fitted latency model to convert it.")
    ratio = float(ms) / model.dense_ms
    if ratio > 1.0:
        raise ConfigError(f"target_ms={ms} is above the dense model's predicted latency ({model.dense_ms:.3f} ms): "
                          "nothing to prune; give a smaller target_ms.")
    return ratio


def latency_budget(assign: Callable[[UnitSpace, float], torch.Tensor], space: UnitSpace, target: float,
                   model: LatencyModel, iterations: int = 8, tolerance: float = 0.005) -> torch.Tensor:
    """Architectures (K, U) of ``assign(space, ratio)`` whose mean predicted latency ratio is the
    largest at most ``target``.

    ``assign`` is called on the latency-priced space (:meth:`LatencyModel.priced_space`: the
    assignment's MACs budget becomes a linearised latency budget), then the ratio passed is corrected
    (proportional step, then bisection) by the exact prediction until it is within ``tolerance``
    below ``target``. If no ratio meets the target, the smallest architectures found are returned.
    """
    priced = model.priced_space(space)
    best: tuple[float, torch.Tensor] | None = None  # (ratio, archs) of the largest feasible
    smallest: tuple[float, torch.Tensor] | None = None
    lo, hi, ask = 0.0, 1.0, target
    for _ in range(iterations):
        archs = assign(priced, ask)  # (K, U)
        with torch.no_grad():
            r = float(model.latency_ratio(archs.to(torch.float64)).mean())
        if smallest is None or r < smallest[0]:
            smallest = (r, archs)
        if r <= target:
            lo = ask
            if best is None or r > best[0]:
                best = (r, archs)
            if r >= target - tolerance or ask >= 1.0:
                break
        else:
            hi = ask
        step = ask * target / max(r, 1e-9)  # proportional guess, kept inside the bracket
        ask = step if lo < step < hi else (lo + hi) / 2
        ask = min(max(ask, 1e-4), 1.0)
    return (best or smallest)[1]
