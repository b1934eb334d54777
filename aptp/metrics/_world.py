"""Shared by the embedded world's metrics: loading the attribute evaluator (:mod:`aptp.world.evaluator`)
lazily and turning metric inputs (N, 3, H, W) in [0, 1] into its inputs and features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aptp.core.interfaces import Metric
from aptp.metrics._common import MissingWeightsError, batches


def evaluator_dir(path: str | None) -> Path:
    """The evaluator folder: ``path``, or the one shipped in the package."""
    from aptp.world.evaluator import DEFAULT_EVALUATOR_DIR

    return Path(path) if path is not None else DEFAULT_EVALUATOR_DIR


def evaluator_available(path: str | None) -> bool:
    """Whether evaluator weights (``model.safetensors`` + ``config.json``) are there."""
    d = evaluator_dir(path)
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def load(path: str | None, metric: str) -> Any:
    """The world evaluator (an ``nn.Module`` in eval mode) from ``path`` or the shipped weights."""
    from aptp.world.evaluator import load_evaluator

    if not evaluator_available(path):
        raise MissingWeightsError(
            f"{metric}: no world evaluator at {evaluator_dir(path)} (needs model.safetensors and config.json). "
            "Train one with `python -m aptp.world.tools.train_evaluator --out DIR` and set the metric's `evaluator` "
            "(e.g. `metrics[0].evaluator=DIR`)."
        )
    return load_evaluator(path)


def to_evaluator_input(evaluator: Any, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, S, S) in [-1, 1] at the evaluator's size S (antialiased
    bilinear when the sizes differ, like the world's box-downsampled renders)."""
    size = int(evaluator.config["image_size"])
    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images * 2.0 - 1.0


@torch.no_grad()
def features(evaluator: Any, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The evaluator's penultimate features (N, D), float64."""
    out = [evaluator.embed(to_evaluator_input(evaluator, images[sl]), batch_size=batch_size).double()
           for sl in batches(images.shape[0], batch_size)]
    return torch.cat(out)


class EvaluatorMetric(Metric):
    """Base of the world metrics: the world evaluator (``config.evaluator``) loads on first use."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._evaluator: Any = None

    def can_probe(self) -> bool:
        """Whether the evaluator weights are present (then compute runs in milliseconds)."""
        return evaluator_available(self.config.evaluator)

    def load(self) -> Any:
        if self._evaluator is None:
            self._evaluator = load(self.config.evaluator, self.name)
        return self._evaluator
