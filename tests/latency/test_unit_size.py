"""Hardware-aligned ResNet units (``resnet_channels.channels_per_unit``): the default is unchanged,
and aligned units keep gated == cut exactness and the MACs agreement with FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from aptp.core.resources import flop_counter_macs
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.pruners.granularities import AttentionHeads, Depth, FFN, ResnetChannels, ResnetChannelsConfig
from aptp.pruners.granularities.toolkit import dummy_inputs
from aptp.pruners.granularities.resnet_channels import unit_width
from aptp.testing import check_granularity_exactness, random_architectures


def test_unit_width():
    assert unit_width(320, 32, 0) == 10  # the default: one GroupNorm group
    assert unit_width(320, 32, 16) == 80  # lcm(10, 16): whole groups on a 16-channel boundary
    assert unit_width(32, 8, 16) == 16
    assert unit_width(640, 32, 32) == 160
    assert unit_width(96, 32, 64) == 96  # lcm 192 exceeds the block: one unit, the whole block
    with pytest.raises(ValueError, match="channels_per_unit"):
        ResnetChannelsConfig(channels_per_unit=-1)


def test_default_unit_space_is_unchanged(tiny):
    _, denoiser, grans, space = tiny
    aligned_to_group = ResnetChannels(ResnetChannelsConfig(channels_per_unit=1))  # lcm(s, 1) = s
    again = build_unit_space(denoiser, [aligned_to_group, *grans[1:]], tiny[0].conditioning())
    assert again.fingerprint() == space.fingerprint()


def _aligned(cpu: int = 16):
    return [ResnetChannels(ResnetChannelsConfig(channels_per_unit=cpu)), AttentionHeads(), FFN(), Depth()]


def test_aligned_units_are_exact(tiny):
    report = check_granularity_exactness(tiny[0], _aligned(), num_architectures=5)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale), report
    assert all(cut == predicted for cut, predicted in report.params)


def test_aligned_units_macs_agree_with_flop_counter(tiny):
    backbone, denoiser, _, _ = tiny
    grans = _aligned()
    space = build_unit_space(denoiser, grans, backbone.conditioning())
    resnets = [g for g in space.groups if g.kind == "resnet_channels"]
    assert all(g.meta["channels_per_unit"] % 16 == 0 or g.num_units == 1 for g in resnets)
    x, t, c = dummy_inputs(backbone.conditioning(), 1)
    for arch in random_architectures(space, 4, seed=2):
        ref = flop_counter_macs(cut_model(denoiser, space, grans, arch), x, t, c, return_dict=False)
        assert float(space.kept_macs(arch)) == pytest.approx(ref, rel=0.005)
