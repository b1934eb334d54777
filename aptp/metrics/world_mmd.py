"""``world_mmd``: CMMD computed on the world evaluator's features instead of CLIP's (the embedded
world's analogue of CMMD), lower is better.

Exactly CMMD's recipe (:mod:`aptp.metrics.cmmd`) with another embedding: the evaluator's
penultimate features (``evaluator.embed`` on images mapped to [-1, 1] at its size), L2-normalised
like CLIP embeddings, then :func:`aptp.metrics.mmd.mmd`, the biased RBF MMD^2 with sigma = 10,
times 1000. Evaluator weights: ``evaluator`` (a folder with ``model.safetensors`` +
``config.json``), default the ones shipped in the package; loaded on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from aptp.metrics import _world
from aptp.metrics._common import check_images
from aptp.metrics.mmd import SCALE, SIGMA, mmd


@dataclass
class WorldMmdConfig:
    """Parameters of ``world_mmd``."""

    evaluator: Optional[str] = None  # evaluator folder; None: the weights shipped in the package
    sigma: float = SIGMA  # RBF kernel width (CMMD's)
    scale: float = SCALE  # reported as scale x MMD^2 (CMMD's 1000)
    normalize: bool = True  # L2-normalise the features, as CMMD does with CLIP embeddings
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"world_mmd: sigma must be > 0, got {self.sigma}.")
        if not self.scale > 0:
            raise ValueError(f"world_mmd: scale must be > 0, got {self.scale}.")
        if self.batch_size < 1:
            raise ValueError(f"world_mmd: batch_size must be >= 1, got {self.batch_size}.")


class WorldMmd(_world.EvaluatorMetric):
    """CMMD's RBF MMD (sigma 10, x1000) between world-evaluator features of generated and reference images."""

    config_class = WorldMmdConfig
    name: ClassVar[str] = "world_mmd"
    higher_is_better: ClassVar[bool] = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluator features (N, D), float64, L2-normalised when ``normalize``."""
        f = _world.features(self.load(), check_images(images), self.config.batch_size)
        return torch.nn.functional.normalize(f, dim=-1) if self.config.normalize else f

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """MMD to the ``reference`` images (required); ``prompts`` are not used."""
        if reference is None:
            raise ValueError("world_mmd needs reference images: compute(images, prompts, reference=real_images).")
        ref = self.features(check_images(reference, "reference"))
        return mmd(ref, self.features(images), sigma=self.config.sigma, scale=self.config.scale)
