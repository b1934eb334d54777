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
from aptp.core.interfaces import Conditioning
from aptp.core.units import UnitSpace
from aptp.pruners.gating import build_unit_space, cut_model, uniform_architecture
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
BUDGET = 0.6  # kept-MACs ratio of the static model
ROUTED_RATIOS = (0.45, 0.55, 0.65, 0.75)  # K = 4 routed experts, mean = BUDGET


def bench_backbone() -> UNetBackbone:
    """The benchmarked backbone (random weights of ``PRESET`` at ``RESOLUTION``)."""
    return UNetBackbone(UNetBackboneConfig(preset=PRESET, resolution=RESOLUTION))


class WidthExperts:
    """The dense model's width unit space (ResNet channel groups, attention heads, FFN groups) and
    experts keeping a uniform fraction of every width group."""

    def __init__(self, dense: nn.Module, conditioning: Conditioning) -> None:
        self.dense = dense
        self.granularities = [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()),
                              FFN(FFNConfig())]
        self.space: UnitSpace = build_unit_space(dense, self.granularities, conditioning)

    def cut(self, ratio: float) -> tuple[nn.Module, float]:
        """(expert at about ``ratio`` of the dense MACs, its exact MACs ratio)."""
        arch = uniform_architecture(self.space, ratio)
        return cut_model(self.dense, self.space, self.granularities, arch).eval(), float(self.space.macs_ratio(arch))
