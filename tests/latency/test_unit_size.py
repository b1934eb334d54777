"""Hardware-aligned ResNet units (``resnet_channels.channels_per_unit``): the default is unchanged,
and aligned units keep gated == cut exactness and the MACs agreement with FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from aptp.core.resources import flop_counter_macs
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.core.units import UnitSpace
from aptp.pruners.granularities import (
    FFN,
    AttentionHeads,
    AttentionHeadsConfig,
    Depth,
    FFNConfig,
    ResnetChannels,
    ResnetChannelsConfig,
)
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


# ------------------------------------------------------------------ FFN units in channels (issue 17)
def test_ffn_channels_per_unit(tiny):
    backbone, denoiser, grans, space = tiny
    cond = backbone.conditioning()
    plain = [g for g in space.groups if g.kind == "ffn"]
    aligned = [g for g in build_unit_space(denoiser, [FFN(FFNConfig(channels_per_unit=16))], cond).groups]
    assert [g.path for g in aligned] == [g.path for g in plain]
    for a, p in zip(aligned, plain):
        width = p.num_units * p.meta["channels_per_unit"]
        assert a.meta["channels_per_unit"] % 16 == 0 and a.num_units * a.meta["channels_per_unit"] == width
        assert a.macs_per_unit * a.num_units == pytest.approx(p.macs_per_unit * p.num_units, rel=1e-12)
    default = build_unit_space(denoiser, [FFN(FFNConfig(channels_per_unit=0))], cond)
    assert default.fingerprint() == build_unit_space(denoiser, [FFN()], cond).fingerprint()
    ffn = FFN(FFNConfig(channels_per_unit=48))  # no multiple of 48 divides 256: one unit, the whole FFN
    assert ffn._units(256, "x") == 1 and ffn._units(96, "x") == 2
    with pytest.raises(ValueError, match="channels_per_unit"):
        FFNConfig(channels_per_unit=-1)


def _all_aligned(cpu: int = 16):
    return [ResnetChannels(ResnetChannelsConfig(channels_per_unit=cpu)), AttentionHeads(),
            FFN(FFNConfig(channels_per_unit=cpu)), Depth()]


def test_aligned_ffn_and_resnet_units_are_exact_and_macs_agree(tiny):
    report = check_granularity_exactness(tiny[0], _all_aligned(), num_architectures=5)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale), report
    assert all(cut == predicted for cut, predicted in report.params)
    backbone, denoiser, _, _ = tiny
    grans = _all_aligned()
    space = build_unit_space(denoiser, grans, backbone.conditioning())
    x, t, c = dummy_inputs(backbone.conditioning(), 1)
    for arch in random_architectures(space, 4, seed=3):
        ref = flop_counter_macs(cut_model(denoiser, space, grans, arch), x, t, c, return_dict=False)
        assert float(space.kept_macs(arch)) == pytest.approx(ref, rel=0.005)


# ------------------------------------------------------------- minimum kept width (issue 17)
def _with_minimum():
    """ResNets in 16-channel units, at least 32 kept (2 units); FFNs in 16-channel units, at least 64
    kept (4 units); attentions at least 2 heads."""
    return [ResnetChannels(ResnetChannelsConfig(channels_per_unit=16, min_kept_channels=32)),
            AttentionHeads(AttentionHeadsConfig(min_kept_heads=2)),
            FFN(FFNConfig(channels_per_unit=16, min_kept_channels=64)), Depth()]


def _boundary_archs(space, n: int, seed: int = 0) -> torch.Tensor:
    """(n, U): every width group keeps min_kept - 1 or min_kept units (random ones), blocks random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, space.size)
    for b in range(n):
        for i, grp in enumerate(space.groups):
            sl = space.group_slice(i)
            if grp.is_depth:
                out[b, sl] = (torch.rand(grp.num_units, generator=g) < 0.8).float()
                continue
            k = min(grp.num_units, max(grp.min_kept, 1) - int(torch.randint(0, 2, (1,), generator=g)))
            pick = torch.randperm(grp.num_units, generator=g)[:k]
            out[b, sl.start + pick] = 1.0
    return out


@pytest.fixture(scope="module")
def with_minimum(tiny):
    backbone, denoiser, _, _ = tiny
    grans = _with_minimum()
    return grans, build_unit_space(denoiser, grans, backbone.conditioning())


def test_minimum_kept_width_in_the_unit_space(tiny, with_minimum):
    _, space = with_minimum
    mins = {g.kind: {x.min_kept for x in space.groups if x.kind == g.kind} for g in space.groups}
    assert mins["resnet_channels"] == {2} and mins["ffn"] == {4} and mins["attention_heads"] == {2}
    assert mins["depth"] == {0}
    assert space.fingerprint() != build_unit_space(tiny[1], _all_aligned(), tiny[0].conditioning()).fingerprint()
    assert UnitSpace.from_dict(space.to_dict()) == space  # stored and loaded with its minimum
    # below the minimum a group counts as empty; at it, as kept; gradient: straight through
    arch = _boundary_archs(space, 1, seed=4)[0].requires_grad_(True)
    norm = space.normalise(arch)
    for i, grp in enumerate(space.groups):
        kept = float(arch.detach()[space.group_slice(i)].sum())
        got = float(norm[space.group_slice(i)].sum())
        assert got == (kept if grp.is_depth or kept >= grp.min_kept else 0.0)
    zeroed = norm.detach()
    assert float(space.kept_macs(arch)) == float(space.kept_macs(zeroed))
    assert float(space.kept_params(arch)) == float(space.kept_params(zeroed))
    space.kept_macs(arch).backward()
    assert bool((arch.grad > 0).any()) and float(arch.grad.sum()) > 0  # the removed units still learn
    for cfg, match in [(lambda: ResnetChannelsConfig(min_kept_channels=-1), "min_kept_channels"),
                       (lambda: FFNConfig(min_kept_channels=-1), "min_kept_channels"),
                       (lambda: AttentionHeadsConfig(min_kept_heads=-1), "min_kept_heads")]:
        with pytest.raises(ValueError, match=match):
            cfg()


def test_minimum_kept_width_gated_equals_cut_at_the_boundary(tiny, with_minimum):
    """Groups keeping min_kept - 1 units are cut to width zero (bypass, no head, empty FFN) by the
    cut and by the gates alike; parameters and MACs (FlopCounterMode) are the unit space's."""
    from aptp.core.resources import count_params
    from aptp.pruners.gating import Gates
    from aptp.pruners.granularities._modules import NoHeadAttention, ResidualBypass

    backbone, denoiser, _, _ = tiny
    grans, space = with_minimum
    archs = _boundary_archs(space, 3, seed=0)  # (3, U)
    cond = backbone.conditioning()
    g = torch.Generator().manual_seed(1)
    ch, h, w = cond.sample_shape
    x = torch.randn(3, ch, h, w, generator=g)
    t = torch.tensor([10, 500, 990])
    text = torch.randn(3, cond.text_len, cond.text_dim, generator=g)
    with torch.no_grad():
        scale = float(backbone.denoise(denoiser, x, t, text).abs().max())
        with Gates(denoiser, space, grans) as gates:
            gates.set(archs)
            gated = backbone.denoise(denoiser, x, t, text)
        emptied = 0
        for b in range(3):
            expert = cut_model(denoiser, space, grans, archs[b])
            out = backbone.denoise(expert, x[b:b + 1], t[b:b + 1], text[b:b + 1])
            assert float((out - gated[b:b + 1]).abs().max()) <= 1e-5 * max(1.0, scale)
            assert count_params(expert) == int(round(float(space.kept_params(archs[b].double()))))
            ref = flop_counter_macs(expert, *dummy_inputs(cond, 1), return_dict=False)
            assert float(space.kept_macs(archs[b])) == pytest.approx(ref, rel=0.005)
            where = {p: space.offsets[i] + j for i, grp in enumerate(space.groups) for j, p in enumerate(grp.unit_paths)}
            for i, grp in enumerate(space.groups):
                if grp.is_depth or (grp.parent is not None and archs[b, where[grp.parent]] == 0):
                    continue
                below = float(archs[b, space.group_slice(i)].sum()) < grp.min_kept
                m = expert.get_submodule(grp.path)
                if grp.kind == "resnet_channels":
                    assert isinstance(m, ResidualBypass) == below
                elif grp.kind == "attention_heads":
                    assert isinstance(m, NoHeadAttention) == below
                else:
                    assert (m.net[2].in_features == 0) == below
                emptied += below
        assert emptied > 5


def test_minimum_kept_width_contract_check(tiny):
    report = check_granularity_exactness(tiny[0], _with_minimum(), num_architectures=5, keep_prob=0.3)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale), report
    assert all(cut == predicted for cut, predicted in report.params)


def test_latency_model_applies_the_minimum(tiny, with_minimum, flop_timer, tmp_path):
    """The table measures every width; the prediction of a group below its minimum is the group at
    zero, and with the additive fake timer it is the cut model's exactly."""
    from aptp.latency.base import LatencyContext
    from aptp.latency.profiled import ProfiledLatency, ProfiledLatencyConfig

    backbone, denoiser, _, _ = tiny
    grans, space = with_minimum
    model = ProfiledLatency(ProfiledLatencyConfig(cache_dir=str(tmp_path), buckets=3))
    model.timer = flop_timer
    model.fit(LatencyContext(denoiser, space, grans, backbone.conditioning(), backbone.denoise))
    x, t, c = dummy_inputs(backbone.conditioning(), 1)
    for arch in _boundary_archs(space, 3, seed=5):
        assert float(model.latency(arch)) == pytest.approx(float(model.latency(space.normalise(arch))), rel=1e-12)
        ref = flop_counter_macs(cut_model(denoiser, space, grans, arch), x, t, c, return_dict=False) / 1e6
        assert float(model.latency(arch)) == pytest.approx(ref, rel=1e-6)
