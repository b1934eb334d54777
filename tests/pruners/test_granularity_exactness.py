"""A hard-gated model and the physically cut expert compute the same function."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import GRANULARITY_SETS, make_granularities, random_arch
from hypothesis import given, settings
from hypothesis import strategies as st

from aptp.core.resources import count_params
from aptp.pruners.gating import Gates, build_unit_space, cut_model
from aptp.testing import check_granularity_exactness

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


@pytest.mark.parametrize("which", list(GRANULARITY_SETS))
def test_contract_check_passes_with_parameter_counts(which, tiny_backbone):
    """aptp.testing's check (dense, empty and random per-sample architectures), check_params on."""
    report = check_granularity_exactness(tiny_backbone, make_granularities(GRANULARITY_SETS[which]),
                                         num_architectures=4, seed=2)
    assert report.max_abs_diff <= TOL * max(1.0, report.output_scale)
    assert all(got == want for got, want in report.params)


def _structured_arch(space, seed: int) -> torch.Tensor:
    """(U,) architecture where each group is, at random, all kept, all cut, or half at random: the
    cases a uniform random architecture almost never draws (a whole ResNet / attention / FFN cut to
    width zero, with its block kept or dropped)."""
    g = torch.Generator().manual_seed(seed)
    arch = torch.empty(space.size)
    for i in range(len(space.groups)):
        sl = space.group_slice(i)
        mode = int(torch.randint(0, 3, (1,), generator=g))
        n = sl.stop - sl.start
        arch[sl] = 1.0 if mode == 0 else 0.0 if mode == 1 else (torch.rand(n, generator=g) < 0.5).float()
    return arch


@pytest.mark.parametrize("which", list(GRANULARITY_SETS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_parameter_count_is_the_unit_spaces_for_any_architecture(which, seed, tiny_unet, tiny_spaces):
    space, grans = tiny_spaces[which]
    arch = _structured_arch(space, seed)
    expert = cut_model(tiny_unet, space, grans, arch)
    assert count_params(expert) == int(round(float(space.kept_params(arch))))


def test_a_resnet_cut_to_width_zero_keeps_its_width_independent_parameters(tiny_unet, tiny_spaces):
    """The cause of the old 2,496 / 3,776-parameter gap: a fully width-cut ResNet lost norm1 (2 C_in),
    which no unit owns. Now only a depth cut removes a block's norm1."""
    from aptp.pruners.granularities._modules import ResidualBypass

    space, grans = tiny_spaces["all"]
    arch = torch.zeros(space.size)
    assert count_params(cut_model(tiny_unet, space, grans, arch)) == int(space.kept_params(arch)) == 365_124
    arch[space.mask_of_kind("depth")] = 1.0  # keep every block, cut every width unit
    expert = cut_model(tiny_unet, space, grans, arch)
    bypasses = [(p, m) for p, m in expert.named_modules() if isinstance(m, ResidualBypass)]
    assert bypasses and all(m.norm1 is not None for _, m in bypasses)
    dense_norm1 = {p: tiny_unet.get_submodule(f"{p}.norm1").weight for p, _ in bypasses}
    assert all(torch.equal(m.norm1.weight, dense_norm1[p]) for p, m in bypasses)  # same key, same weights
    assert count_params(expert) == int(round(float(space.kept_params(arch))))


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


class _QKNormDenoiser(torch.nn.Module):
    """A minimal denoiser around one diffusers self-attention with qk-norm (LayerNorms no head owns)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(8, heads=2, dim_head=4, qk_norm="layer_norm")

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        b, c, h, w = sample.shape
        y = self.attn(sample.flatten(2).transpose(1, 2))  # (B, H W, C)
        return (y.transpose(1, 2).reshape(b, c, h, w),)


@pytest.mark.parametrize("keep", [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
def test_an_attention_cut_to_zero_heads_keeps_what_no_head_owns(keep):
    from aptp.core.interfaces import Conditioning

    torch.manual_seed(0)
    model = _QKNormDenoiser().eval()
    grans = make_granularities(["attention_heads"])
    space = build_unit_space(model, grans, Conditioning((8, 2, 2), 3, 8))
    arch = torch.tensor(keep)
    x = torch.randn(1, 8, 2, 2)
    with Gates(model, space, grans) as gates, torch.no_grad():
        gates.set(arch)
        gated = model(x, None)[0]
    expert = cut_model(model, space, grans, arch)
    with torch.no_grad():
        assert torch.allclose(expert(x, None)[0], gated, atol=1e-6)
    assert count_params(expert) == int(space.kept_params(arch))
