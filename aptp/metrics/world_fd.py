"""``world_fd``: Fréchet distance between the world evaluator's penultimate features of generated and
reference images (the embedded world's analogue of FID), lower is better.

Features come from :mod:`aptp.world.evaluator` (``evaluator.embed`` on images mapped to [-1, 1] at
the evaluator's size); the distance is :func:`aptp.metrics.frechet.frechet_distance` in float64
(``method`` as there). Evaluator weights: ``evaluator`` (a folder with ``model.safetensors`` +
``config.json``), default the ones shipped in the package; loaded on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from aptp.metrics import _world
from aptp.metrics._common import check_images
from aptp.metrics.frechet import METHODS, frechet_distance_features


@dataclass
class WorldFdConfig:
    """Parameters of ``world_fd``."""

    evaluator: Optional[str] = None  # evaluator folder; None: the weights shipped in the package
    method: str = "eigh"  # sqrt-trace of the covariance product: "eigh" or "sqrtm"
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"world_fd: method must be one of {METHODS}, got {self.method!r}.")
        if self.batch_size < 1:
            raise ValueError(f"world_fd: batch_size must be >= 1, got {self.batch_size}.")


class WorldFd(_world.EvaluatorMetric):
    """Fréchet distance between world-evaluator features of generated and reference images."""

    config_class = WorldFdConfig
    name: ClassVar[str] = "world_fd"
    higher_is_better: ClassVar[bool] = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluator features (N, D), float64."""
        return _world.features(self.load(), check_images(images), self.config.batch_size)

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """Fréchet distance to the ``reference`` images (required); ``prompts`` are not used."""
        if reference is None:
            raise ValueError("world_fd needs reference images: compute(images, prompts, reference=real_images).")
        return frechet_distance_features(self.features(images), self.features(check_images(reference, "reference")),
                                         method=self.config.method)
