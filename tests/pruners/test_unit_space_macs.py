"""Unit-space sizes and the analytic MACs model against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import GRANULARITY_SETS, make_granularities, random_arch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.resources import count_params, flop_counter_macs
from aptp.pruners.gating import build_unit_space, cut_model, uniform_architecture
from aptp.pruners.granularities.toolkit import dummy_inputs

MACS_TOL = 0.005  # 0.5 %


@pytest.fixture(scope="module")
def sd21_meta():
    bb = UNetBackbone(UNetBackboneConfig(preset="sd21", resolution=512))  # 64x64 latent, 77 tokens
    unet = bb.build_denoiser("meta")
    grans = make_granularities(GRANULARITY_SETS["all"])
    return unet, grans, build_unit_space(unet, grans, bb.conditioning()), bb.conditioning()


def _ref_macs(model, cond, device):
    return flop_counter_macs(model, *dummy_inputs(cond, 1, device), return_dict=False)


def test_sd21_unit_space_is_the_papers(sd21_meta):
    unet, _, space, _ = sd21_meta
    counts = {k: int(space.mask_of_kind(k).sum()) for k in space.kinds()}
    assert counts == {"resnet_channels": 704, "attention_heads": 390, "ffn": 512, "depth": 14}
    assert space.size == 1620 and space.size - counts["depth"] == 1606
    assert space.total_params == count_params(unet) == 865_910_724
    heads = [g for g in space.groups if g.kind == "attention_heads"]
    assert {g.meta["attention"] for g in heads} == {"self", "cross"}
    assert all(g.meta["key_len"] == 77 for g in heads if g.meta["attention"] == "cross")
    depth = next(g for g in space.groups if g.kind == "depth")
    assert depth.unit_paths[:2] == ("down_blocks.3.resnets.1", "up_blocks.0.resnets.2")  # lowest res first, in pairs
    assert depth.unit_paths[-2:] == ("down_blocks.0.resnets.1", "up_blocks.3.resnets.2")
    # width units inside droppable blocks name their depth unit as parent
    nested = {g.path: g.parent for g in space.groups if g.parent is not None}
    assert nested["down_blocks.3.resnets.1"] == "down_blocks.3.resnets.1"
    assert nested["up_blocks.1.attentions.2.transformer_blocks.0.attn2"] == "up_blocks.1.attentions.2"
    assert "down_blocks.0.resnets.0" not in nested


def test_sd21_dense_macs_match_flop_counter_and_reference(sd21_meta):
    unet, _, space, cond = sd21_meta
    ref = _ref_macs(unet, cond, "meta")
    assert abs(space.total_macs / ref - 1) < MACS_TOL
    assert round(space.total_macs / 1e9, 1) == 402.1  # environment.md: 402.1 GMACs at 64x64, 77 tokens


@pytest.mark.parametrize("seed,p_drop", [(0, 0.1), (1, 0.4), (2, 0.7), (3, 0.95)])
def test_sd21_random_architectures_macs(sd21_meta, seed, p_drop):
    unet, grans, space, cond = sd21_meta
    arch = random_arch(space.size, seed, p_drop)
    expert = cut_model(unet, space, grans, arch)  # meta: shapes only
    ref = _ref_macs(expert, cond, "meta")
    assert abs(float(space.kept_macs(arch)) / ref - 1) < MACS_TOL
    # exact; float64 because kept_params sums in the architecture's dtype and float32 cannot hold
    # SD2.1's 865,910,724 parameters exactly (its spacing there is 64)
    assert int(round(float(space.kept_params(arch.double())))) == count_params(expert)


@pytest.mark.parametrize("which", list(GRANULARITY_SETS))
def test_tiny_macs_agree_on_cpu(which, tiny_backbone, tiny_unet, tiny_spaces):
    """Real CPU forward (SDPA's CPU kernel counted through the registered formula)."""
    space, grans = tiny_spaces[which]
    cond = tiny_backbone.conditioning()
    dense = _ref_macs(tiny_unet, cond, "cpu")
    assert abs(space.total_macs / dense - 1) < MACS_TOL
    for seed, p in [(0, 0.3), (1, 0.8)]:
        arch = random_arch(space.size, seed, p)
        ref = _ref_macs(cut_model(tiny_unet, space, grans, arch), cond, "cpu")
        assert abs(float(space.kept_macs(arch)) / ref - 1) < MACS_TOL


def test_attention_is_counted_with_text_length_for_cross_attention(tiny_backbone, tiny_unet):
    cond = tiny_backbone.conditioning()
    grans = make_granularities(["attention_heads"])
    base = build_unit_space(tiny_unet, grans, cond)
    longer = build_unit_space(tiny_unet, grans, type(cond)(cond.sample_shape, cond.text_len * 2, cond.text_dim))
    for a, b in zip(base.groups, longer.groups):
        if a.meta["attention"] == "cross":
            assert b.macs_per_unit > a.macs_per_unit
        else:
            assert b.macs_per_unit == a.macs_per_unit


def test_kept_macs_is_differentiable_and_parents_gate_children(tiny_spaces):
    space, _ = tiny_spaces["all"]
    soft = torch.full((2, space.size), 0.5, requires_grad=True)
    r = space.macs_ratio(soft)  # (2,)
    r.sum().backward()
    assert soft.grad is not None and float(soft.grad.abs().sum()) > 0
    arch = torch.ones(space.size)
    depth = space.mask_of_kind("depth")
    arch[depth] = 0
    children = torch.tensor([g.parent is not None for g in space.groups for _ in range(g.num_units)])
    arch2 = arch.clone()
    arch2[children] = 0  # children of dropped blocks cost nothing either way
    assert float(space.kept_macs(arch)) == pytest.approx(float(space.kept_macs(arch2)))


@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.4])
def test_uniform_architecture_meets_budget(tiny_spaces, ratio):
    space, _ = tiny_spaces["all"]
    arch = uniform_architecture(space, ratio)
    r = float(space.macs_ratio(arch))
    assert r <= ratio + 1e-9 and r > ratio - 0.05


class _Bilinear(torch.nn.Module):
    """A module whose only matmul is its own (no Linear child): y = x W x^T per token pair."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, N)
        return (x @ self.w) @ x.transpose(1, 2)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(5, 8)
        self.pair = _Bilinear(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(self.inp(x))


def _bilinear_macs(module, args, kwargs, output) -> float:
    b, n, d = args[0].shape
    return float(b * n * d * d + b * n * n * d)  # x W, then (x W) x^T


def test_a_registered_macs_formula_teaches_the_tracer_a_module_type():
    from aptp.core.resources import macs_formula, register_macs_formula, trace_modules

    net, x = _Net(), torch.randn(3, 6, 5)  # (B, N, D_in)
    ref = flop_counter_macs(net, x)
    assert macs_formula(net.pair) is None
    assert trace_modules(net, x).total_macs == pytest.approx(6 * 5 * 8)  # the Linear only, per sample
    register_macs_formula(_Bilinear, _bilinear_macs)
    register_macs_formula(_Bilinear, _bilinear_macs)  # the same function again: a no-op
    tr = trace_modules(net, x)
    assert tr.macs("pair") == pytest.approx(6 * 8 * 8 + 6 * 6 * 8)
    assert tr.total_macs * 3 == pytest.approx(ref, rel=1e-9)  # per sample x batch == FlopCounterMode

    class Sub(_Bilinear):  # subclasses inherit their base's formula
        pass

    assert macs_formula(Sub(4)) is _bilinear_macs
    with pytest.raises(ValueError, match="already has the MACs formula .*replace=True"):
        register_macs_formula(_Bilinear, lambda *a: 0.0)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_macs_formula(int, _bilinear_macs)
