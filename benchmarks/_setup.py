"""What the latency and memory benchmarks share: their environment switches and width experts.

APTP_BENCH_PRESET (small | tiny | sd21, default small: SD2.1's layout at 0.4 x width), APTP_BENCH_RESOLUTION
(pixels; default 128 for small, else the preset's), APTP_BENCH_DEVICE (cpu | cuda), APTP_BENCH_DTYPE
(float32 | float16).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.units import UnitSpace
from aptp.pruners.gating import cut_model, uniform_architecture
from aptp.pruners.granularities import (
    FFN,
    AttentionHeads,
    AttentionHeadsConfig,
    FFNConfig,
    ResnetChannels,
    ResnetChannelsConfig,
)

PRESET = os.environ.get("APTP_BENCH_PRESET", "small")
RESOLUTION = int(os.environ.get("APTP_BENCH_RESOLUTION", "128" if PRESET == "small" else "0")) or None
DEVICE = os.environ.get("APTP_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("APTP_BENCH_DTYPE", "float32"))


def bench_backbone() -> UNetBackbone:
    """The benchmarked backbone (random weights of ``PRESET`` at ``RESOLUTION``)."""
    return UNetBackbone(UNetBackboneConfig(preset=PRESET, resolution=RESOLUTION))


def width_granularities() -> list:
    """ResNet channel groups, attention heads and FFN groups: the width units the experts cut."""
    return [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig())]


def width_expert(dense: nn.Module, space: UnitSpace, granularities: list, ratio: float) -> tuple[nn.Module, float]:
    """(expert keeping a uniform fraction of every width group at about ``ratio`` of the MACs, its MACs ratio)."""
    arch = uniform_architecture(space, ratio)
    return cut_model(dense, space, granularities, arch).eval(), float(space.macs_ratio(arch))
