"""What the serving benchmarks share: the world backbone, its unit space and K expert architectures."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.config import config_to_dict
from aptp.pruners.gating import build_unit_space, uniform_architecture
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

ROOT = Path(__file__).resolve().parents[2]
K = 8
BUDGET = 0.6  # mean kept-MACs ratio of the routed experts = the static model's ratio


def world_backbone() -> tuple[UNetBackbone, dict]:
    """The embedded world backbone (``configs/backbone/world.yaml``) and its registered reference."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "backbone" / "world.yaml"))
    raw.pop("name")
    bb = UNetBackbone(UNetBackboneConfig(**raw))
    return bb, {"name": "unet", **config_to_dict(bb.config)}


def granularities() -> list:
    return [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig()),
            Depth(DepthConfig())]


def architectures(dense: torch.nn.Module, cond, k: int = K, seed: int = 0):
    """(unit space, granularities, (K, U) architectures keeping scattered units, the static architecture
    at BUDGET). Each expert keeps a random subset of every width group (not the first units: its
    indices are scattered, as a learned expert's are); their kept-MACs ratios are spread evenly around
    the static model's, so their plain mean equals it."""
    grans = granularities()
    space = build_unit_space(dense, grans, cond)
    static = uniform_architecture(space, BUDGET)
    centre = float(space.macs_ratio(static))
    g = torch.Generator().manual_seed(seed)
    targets = torch.linspace(centre - 0.2, centre + 0.2, k)
    archs = []
    for r in targets.tolist():
        lo, hi = 0.0, 1.0
        noise = torch.rand(space.size, generator=g)
        depth = space.mask_of_kind("depth").bool()
        for _ in range(30):  # keep probability p for width units so the MACs ratio hits r
            p = (lo + hi) / 2
            a = (noise < p).float()
            a[depth] = 1.0
            for i, grp in enumerate(space.groups):  # at least one unit per width group
                sl = space.group_slice(i)
                if not grp.unit_paths and a[sl].sum() == 0:
                    a[sl.start] = 1.0
            if float(space.macs_ratio(a)) < r:
                lo = p
            else:
                hi = p
        archs.append(a)
    return space, grans, torch.stack(archs), static
