"""Helpers of the granularity tests (a uniquely named module: ``from conftest import`` would clash
with the other test folders' conftest files)."""

from __future__ import annotations

import torch

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


def random_arch(size: int, seed: int, p_drop: float) -> torch.Tensor:
    """(U,) 0/1 architecture dropping each unit with probability ``p_drop``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=g) >= p_drop).to(torch.float32)
