"""Shared fixtures of the granularity tests: the tiny backbone, its UNet and unit spaces."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import GRANULARITY_SETS, make_granularities

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.pruners.gating import build_unit_space


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
