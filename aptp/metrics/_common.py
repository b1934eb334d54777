"""Helpers shared by the metric components: input checks, resizing, the missing-weights error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from aptp.core.errors import AptpError, ShapeError


class MissingWeightsError(AptpError, FileNotFoundError):
    """A metric needs pretrained weights that were not given or cannot be found."""


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check a float image batch (N, 3, H, W) with values in [0, 1]; return it as float32."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeError(f"{name} must be a (N, 3, H, W) tensor, got {shape}.")
    if images.shape[0] < 1:
        raise ShapeError(f"{name} is empty: a metric needs at least one image.")
    if not images.is_floating_point():
        raise ShapeError(f"{name} must be floating point in [0, 1], got {images.dtype}; pass images.float() / 255.")
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= -1e-4 and hi <= 1 + 1e-4):
        raise ValueError(
            f"{name} must have values in [0, 1], got [{lo:.3g}, {hi:.3g}]; images in [-1, 1] need (x + 1) / 2."
        )
    return images.float()


def check_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """One prompt string per image."""
    prompts = list(prompts)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"need one prompt string per image: {n} images, got {len(prompts)} prompts.")
    return prompts


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def resize(images: torch.Tensor, size: tuple[int, int], filter: str) -> torch.Tensor:
    """Resize (N, C, H, W) to ``size``.

    ``"bicubic"``: antialiased bicubic (Keys a = -0.5), which reproduces PIL's ``BICUBIC`` resize of
    float images (clean-fid's resizer) to ~1e-5 of the value range, up- or down-sampling.
    ``"bilinear"``: ``F.interpolate(..., "bilinear", align_corners=False)`` without antialiasing
    (clean-fid's ``legacy_pytorch`` resizer).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if filter == "bicubic":
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    if filter == "bilinear":
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"resize filter must be 'bicubic' or 'bilinear', got {filter!r}.")


def resize_shortest_center_crop(images: torch.Tensor, shortest: int, crop: int) -> torch.Tensor:
    """CLIPImageProcessor's geometry on (N, C, H, W): scale the short side to ``shortest`` (bicubic,
    antialiased, like PIL), then centre-crop ``crop`` x ``crop``."""
    if crop > shortest:
        raise ValueError(f"crop size {crop} must not exceed the resized short side {shortest}.")
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = shortest, int(shortest * w / h)
    else:
        new_h, new_w = int(shortest * h / w), shortest
    x = resize(images, (new_h, new_w), "bicubic")
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return x[..., top:top + crop, left:left + crop]
