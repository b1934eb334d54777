"""A hard-gated model and the physically cut expert compute the same function."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import GRANULARITY_SETS, make_granularities, random_arch
from hypothesis import given, settings
from hypothesis import strategies as st

from aptp.pruners.gating import Gates, build_unit_space, cut_model

TOL = 1e-5  # max |gated - cut| relative to the output scale (fp32)


def _run(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("which", list(GRANULARITY_SETS))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p_drop=st.floats(0.0, 1.0))
def test_hard_gates_equal_cut_model(which, seed, p_drop, tiny_unet, tiny_inputs, tiny_spaces):
    space, grans = tiny_spaces[which]
    x, t, text = (a[:1] for a in tiny_inputs)
    arch = random_arch(space.size, seed, p_drop)  # (U,)
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(arch[None])  # (1, U)
        gated = _run(tiny_unet, x, t, text)
    expert = cut_model(tiny_unet, space, grans, arch)
    out = _run(expert, x, t, text)
    scale = _run(tiny_unet, x, t, text).abs().max()
    assert float((gated - out).abs().max()) <= TOL * float(scale)
    if bool((arch == 0).any()):
        assert sum(p.numel() for p in expert.parameters()) < space.total_params


def test_per_sample_gates_equal_per_sample_experts(tiny_unet, tiny_inputs, tiny_spaces):
    space, grans = tiny_spaces["all"]
    x, t, text = tiny_inputs  # batch 3
    archs = torch.stack([random_arch(space.size, s, p) for s, p in [(1, 0.2), (2, 0.5), (3, 0.8)]])  # (3, U)
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(archs)
        gated = _run(tiny_unet, x, t, text)  # (3, C, H, W)
    scale = float(_run(tiny_unet, x, t, text).abs().max())
    for b in range(3):
        expert = cut_model(tiny_unet, space, grans, archs[b])
        out = _run(expert, x[b:b + 1], t[b:b + 1], text[b:b + 1])
        assert float((gated[b:b + 1] - out).abs().max()) <= TOL * scale
    # the three experts differ, so the batch really ran three architectures
    assert float((gated[0] - gated[2]).abs().max()) > 0


def test_ungated_is_dense_and_gates_do_not_leak_into_cuts(tiny_unet, tiny_inputs, tiny_spaces):
    space, grans = tiny_spaces["all"]
    x, t, text = tiny_inputs
    dense = _run(tiny_unet, x, t, text)
    arch = random_arch(space.size, 7, 0.5)
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(arch)
        gated = _run(tiny_unet, x, t, text)
        assert not torch.allclose(gated, dense)
        gates.set(None)
        assert torch.equal(_run(tiny_unet, x, t, text), dense)
        gates.set(torch.ones(space.size))
        assert torch.allclose(_run(tiny_unet, x, t, text), dense, atol=1e-6)
        gates.set(arch)
        full = cut_model(tiny_unet, space, grans, torch.ones(space.size))  # cut while gated
        assert torch.equal(_run(full, x, t, text), dense)
    assert torch.equal(_run(tiny_unet, x, t, text), dense)  # hooks removed on exit


@pytest.mark.slow
def test_sd21_hard_gates_equal_cut_model():
    """Once on the real SD2.1 UNet (random fp32 weights, ~3.5 GB) at an 8x8 latent."""
    from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig

    bb = UNetBackbone(UNetBackboneConfig(preset="sd21", resolution=64))
    cond = bb.conditioning()
    assert cond.sample_shape == (4, 8, 8)
    unet = bb.build_denoiser()
    grans = make_granularities(GRANULARITY_SETS["all"])
    space = build_unit_space(unet, grans, cond)
    assert space.size == 1620
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *cond.sample_shape, generator=g)
    text = torch.randn(1, cond.text_len, cond.text_dim, generator=g)
    t = torch.tensor([500])
    arch = random_arch(space.size, 11, 0.3)
    arch[space.mask_of_kind("depth")] = torch.tensor([0.0, 0.0, 1.0, 1.0] + [1.0] * 10)  # drop the lowest stage
    with Gates(unet, space, grans) as gates:
        gates.set(arch)
        gated = _run(unet, x, t, text)
    expert = cut_model(unet, space, grans, arch, inplace=True)  # no 3.5 GB copy: the dense model is done
    out = _run(expert, x, t, text)
    assert float((gated - out).abs().max()) <= TOL * float(gated.abs().max())
