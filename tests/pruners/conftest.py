"""Shared fixtures of the granularity tests: the tiny backbone, its UNet and unit spaces."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
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

GRANULARITY_SETS = {
    "resnet_channels": ["resnet_channels"],
    "attention_heads": ["attention_heads"],
    "ffn": ["ffn"],
    "depth": ["depth"],
    "all": ["resnet_channels", "attention_heads", "ffn", "depth"],
}


def make_granularities(kinds):
    table = {
        "resnet_channels": lambda: ResnetChannels(ResnetChannelsConfig()),
        "attention_heads": lambda: AttentionHeads(AttentionHeadsConfig()),
        "ffn": lambda: FFN(FFNConfig()),
        "depth": lambda: Depth(DepthConfig()),
    }
    return [table[k]() for k in kinds]


@pytest.fixture(scope="session")
def tiny_backbone():
    return UNetBackbone(UNetBackboneConfig(preset="tiny"))


@pytest.fixture(scope="session")
def tiny_unet(tiny_backbone):
    return tiny_backbone.build_denoiser()


@pytest.fixture(scope="session")
def tiny_inputs(tiny_backbone):
    cond = tiny_backbone.conditioning()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *cond.sample_shape, generator=g)  # (B, C, H, W)
    t = torch.tensor([10, 500, 990])  # (B,)
    text = torch.randn(3, cond.text_len, cond.text_dim, generator=g)  # (B, L, D)
    return x, t, text


@pytest.fixture(scope="session")
def tiny_spaces(tiny_backbone, tiny_unet):
    cond = tiny_backbone.conditioning()
    out = {}
    for name, kinds in GRANULARITY_SETS.items():
        grans = make_granularities(kinds)
        out[name] = (build_unit_space(tiny_unet, grans, cond), grans)
    return out


def random_arch(size: int, seed: int, p_drop: float) -> torch.Tensor:
    """(U,) 0/1 architecture dropping each unit with probability ``p_drop``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=g) >= p_drop).to(torch.float32)
