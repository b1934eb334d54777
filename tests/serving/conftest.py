"""Fixtures of the serving tests: the tiny random backbone, its dense UNet and a unit space."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.config import config_to_dict
from aptp.pruners.gating import build_unit_space
from aptp.pruners.granularities import (
    FFN,
    AttentionHeads,
    AttentionHeadsConfig,
    Depth,
    DepthConfig,
    FFNConfig,
    ResnetChannels,
    ResnetChannelsConfig,
)


@pytest.fixture(scope="session")
def tiny():
    """(backbone, dense UNet, unit space of all four granularities, granularities, backbone reference)."""
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny"))
    dense = bb.build_denoiser().eval()
    grans = [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig()),
             Depth(DepthConfig())]
    space = build_unit_space(dense, grans, bb.conditioning())
    return bb, dense, space, grans, {"name": "unet", **config_to_dict(bb.config)}


@pytest.fixture(scope="session")
def tiny_inputs(tiny):
    cond = tiny[0].conditioning()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *cond.sample_shape, generator=g)  # (B, C, H, W)
    t = torch.tensor([10, 500, 990])  # (B,)
    text = torch.randn(3, cond.text_len, cond.text_dim, generator=g)  # (B, L, D)
    return x, t, text


def random_arch(size: int, seed: int, p_drop: float) -> torch.Tensor:
    """(U,) 0/1 architecture dropping each unit with probability ``p_drop``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=g) >= p_drop).to(torch.float32)
