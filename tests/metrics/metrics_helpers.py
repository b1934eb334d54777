"""Helpers of the metric tests: the TorchScript Inception stand-in and seeded random images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyInception(nn.Module):
    """Stand-in for the *file format* and calling convention of inception-2015-12-05.pt."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, dim, generator=g))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.shape[2] != 299 or img.shape[3] != 299:
            raise RuntimeError("TinyInception expects 299 x 299 images")
        if bool(img.min() < 0.0) or bool(img.max() > 255.0):
            raise RuntimeError("TinyInception expects values in [0, 255]")
        x = (img - 128.0) / 128.0
        f = F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj  # (N, 16)
        if return_features:
            return f
        return f.sum(1)


def tiny_inception_features(img_0_255: torch.Tensor) -> torch.Tensor:
    """What the scripted stand-in computes, in eager mode (for hand computations)."""
    return TinyInception()(img_0_255, return_features=True)


def rand_images(n: int, size: int = 32, seed: int = 0, height: int | None = None) -> torch.Tensor:
    """(n, 3, height or size, size) in [0, 1] on the uint8 grid (k / 255), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height or size, size), generator=g).float() / 255.0
