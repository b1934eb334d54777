"""Compute several quality metrics on one image set, for side-by-side comparisons (dense / static /
APTP)::

    metrics = build_metrics(["clip_score", {"name": "fid", "inception_path": "/w/inception-2015-12-05.pt"}])
    row = evaluate(images, prompts, metrics, reference=reference_images)   # {"clip_score": 31.2, "fid": 12.5}

Each metric loads its weights once (on first use) and keeps them, so a ``metrics`` dict built once
serves every model being compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from aptp.core.config import instantiate_config
from aptp.core.interfaces import Metric
from aptp.core.registry import Registry
from aptp.metrics._common import check_images, check_prompts


def metric_name(metric: Metric) -> str:
    """The name a metric is reported under: its registered ``name``, else its class name."""
    return str(getattr(metric, "name", None) or type(metric).__name__.lower())


def build_metrics(specs: Sequence[str | Mapping[str, Any]], registry: Registry | None = None) -> dict[str, Metric]:
    """Metric components from registered names or config sections (``{"name": ..., **params}``),
    keyed by name (a repeated name gets a ``#2``, ``#3`` suffix)."""
    from aptp.core.plugins import default_registry

    registry = registry or default_registry()
    out: dict[str, Metric] = {}
    for item in specs:
        section = {"name": item} if isinstance(item, str) else dict(item)
        if "name" not in section:
            raise ValueError(f"a metric section needs a 'name' (a registered metric), got {section!r}.")
        spec = registry["metric"].get(str(section["name"]))
        key, i = spec.name, 1
        while key in out:
            i += 1
            key = f"{spec.name}#{i}"
        out[key] = spec.build(instantiate_config(spec, section))
    return out


def evaluate(images: torch.Tensor, prompts: Sequence[str], metrics: Mapping[str, Metric] | Sequence[Metric],
             reference: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric on ``images`` (N, 3, H, W) in [0, 1] with their ``prompts`` (and ``reference``
    images (M, 3, H', W') in [0, 1] for distribution metrics): ``{name: value}``, in input order.

    ``metrics`` is a mapping name -> metric (as :func:`build_metrics` returns) or a sequence of
    metrics, reported under :func:`metric_name` (names must then be distinct).
    """
    images = check_images(images)
    prompts = check_prompts(prompts, images.shape[0])
    if reference is not None:
        reference = check_images(reference, "reference")
    if not isinstance(metrics, Mapping):
        named: dict[str, Metric] = {}
        for m in metrics:
            name = metric_name(m)
            if name in named:
                raise ValueError(f"two metrics are named {name!r}; pass a mapping name -> metric instead.")
            named[name] = m
        metrics = named
    results: dict[str, float] = {}
    for name, metric in metrics.items():
        if not isinstance(metric, Metric):
            raise TypeError(f"metric {name!r} must be an aptp Metric, got {type(metric).__name__}.")
        results[name] = float(metric.compute(images, prompts, reference=reference))
    return results
