"""``cmmd``: CLIP-MMD (Jayasumana et al. 2024, "Rethinking FID"), lower is better.

Reference implementation: google-research ``cmmd``. Images (N, 3, H, W) in [0, 1] are resized to
the CLIP vision tower's square input (bicubic, antialiased, no crop: ``jax.image.resize`` in the
reference), normalised with CLIP's mean / std and embedded; embeddings are L2-normalised; the
distance is :func:`aptp.metrics.mmd.mmd`, the reference's biased RBF-kernel MMD^2 with sigma = 10,
times 1000. The paper uses CLIP ViT-L/14 at 336 px (``openai/clip-vit-large-patch14-336``).

The reference set is either ``reference`` images passed to :meth:`compute` or precomputed
embeddings (``reference_embeddings``: a ``.npy`` file of (M, P), e.g. written by
:meth:`Cmmd.save_reference_embeddings`). Weights are loaded on first use, not at build time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from aptp.metrics import _clip
from aptp.metrics._common import check_images
from aptp.metrics.mmd import SCALE, SIGMA, mmd


@dataclass
class CmmdConfig:
    """Parameters of ``cmmd``."""

    model: str = "openai/clip-vit-large-patch14-336"  # a local CLIPModel folder (or a cached hub id)
    sigma: float = SIGMA  # RBF kernel width
    scale: float = SCALE  # CMMD reports 1000 x MMD^2
    reference_embeddings: Optional[str] = None  # .npy (M, P) of reference embeddings, instead of images
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("cmmd: model must name a CLIPModel folder or hub id, got an empty string.")
        if not self.sigma > 0:
            raise ValueError(f"cmmd: sigma must be > 0, got {self.sigma}.")
        if not self.scale > 0:
            raise ValueError(f"cmmd: scale must be > 0, got {self.scale}.")
        if self.batch_size < 1:
            raise ValueError(f"cmmd: batch_size must be >= 1, got {self.batch_size}.")


class Cmmd(_clip.ClipMetric):
    """CMMD: RBF-kernel MMD (sigma 10, x1000) between CLIP embeddings of generated and reference images."""

    config_class = CmmdConfig
    name: ClassVar[str] = "cmmd"
    higher_is_better: ClassVar[bool] = False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (N, P), float32 on CPU."""
        images = check_images(images)
        return _clip.image_embeddings(self.load(), images, self.config.batch_size, geometry="squash")

    def save_reference_embeddings(self, images: torch.Tensor, path: str | Path) -> Path:
        """Embed reference images and write them as ``.npy`` for ``reference_embeddings``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.embed(images).numpy())
        return path

    def _reference(self, reference: torch.Tensor | None) -> torch.Tensor:
        if reference is not None:
            return self.embed(check_images(reference, "reference"))
        if self.config.reference_embeddings is None:
            raise ValueError(
                "cmmd needs a reference set: pass reference images to compute(..., reference=images) or set "
                "`reference_embeddings` to a .npy file written by Cmmd.save_reference_embeddings."
            )
        path = Path(self.config.reference_embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"cmmd: reference_embeddings file {path} does not exist.")
        ref = torch.from_numpy(np.load(path))
        if ref.dim() != 2:
            raise ValueError(f"cmmd: {path} must hold an (M, P) embedding matrix, got shape {tuple(ref.shape)}.")
        return ref

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """CMMD between ``images`` and the reference set (``prompts`` are not used)."""
        x = self.embed(images)  # (N, P)
        y = self._reference(reference)  # (M, P)
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"cmmd: generated embeddings have width {x.shape[1]} but the reference has {y.shape[1]}; "
                "the reference embeddings were computed with another CLIP model."
            )
        return mmd(y, x, sigma=self.config.sigma, scale=self.config.scale)
