"""Fixtures of the latency tests: the tiny backbone's denoiser, its unit space, and a *fake timer*
(:class:`fake_timers.FlopTimer`) that reports a candidate's MACs in millions as its "milliseconds":
deterministic, exactly additive over modules and linear in kept units, so the profiled model must
predict it exactly."""

from __future__ import annotations

import pytest
import torch

from aptp.core.plugins import default_registry
from aptp.latency.base import LatencyContext
from aptp.pruners.gating import build_unit_space

from fake_timers import FlopTimer


@pytest.fixture(scope="session")
def tiny():
    """(backbone, denoiser, granularities, unit space) of the tiny preset, width + depth units."""
    reg = default_registry()
    backbone = reg["backbone"].get("unet").build(reg["backbone"].get("unet").config_class(preset="tiny"))
    torch.manual_seed(0)
    denoiser = backbone.build_denoiser("cpu").eval().requires_grad_(False)
    grans = [reg["granularity"].get(n).build() for n in ("resnet_channels", "attention_heads", "ffn", "depth")]
    space = build_unit_space(denoiser, grans, backbone.conditioning())
    return backbone, denoiser, grans, space


@pytest.fixture
def context(tiny):
    backbone, denoiser, grans, space = tiny
    return LatencyContext(denoiser, space, grans, backbone.conditioning(), backbone.denoise)


@pytest.fixture
def flop_timer():
    return FlopTimer()
