"""The built-in ``depth`` granularity on transformer denoisers (diffusers DiT / PixArt): the inner
``transformer_blocks`` drop middle-out as residual bypasses; hard gates equal physical cuts, the
analytic MACs agree with FlopCounterMode, and the block gate has the rank of the block's output."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.transformer import DiTBackbone, DiTBackboneConfig
from aptp.core.plugins import default_registry
from aptp.core.resources import count_params, flop_counter_macs
from aptp.pruners.gating import Gates, build_unit_space, cut_model
from aptp.pruners.granularities import Depth, DepthConfig
from aptp.pruners.granularities._modules import SkipTransformerBlock
from aptp.pruners.granularities.depth import middle_out
from aptp.testing import check_granularity_exactness, random_architectures

MACS_TOL = 0.005  # 0.5 %
NO_SIZE_COND = {"resolution": None, "aspect_ratio": None}


def _granularities(*names: str):
    reg = default_registry()["granularity"]
    return [reg.get(n).build() for n in names]


@pytest.fixture(scope="module")
def tiny():
    return DiTBackbone(DiTBackboneConfig())  # 4 BasicTransformerBlocks of width 64


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny.build_denoiser()


def _inputs(cond, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cond.sample_shape, generator=g)  # (B, C, H, W)
    text = torch.randn(batch, cond.text_len, cond.text_dim, generator=g)  # (B, L, D)
    t = torch.randint(0, 1000, (batch,), generator=g)  # (B,)
    return x, t, text


def _ref_macs(model, x, t, text) -> int:
    return flop_counter_macs(model, x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=NO_SIZE_COND)


# ------------------------------------------------------------------------------- which blocks
def test_middle_out_order():
    assert middle_out(6, 1) == [2, 3, 1, 4]
    assert middle_out(5, 1) == [2, 1, 3]
    assert middle_out(4, 0) == [1, 2, 0, 3]
    assert middle_out(2, 1) == []


def test_tiny_dit_units_order_and_nesting(tiny, tiny_model):
    space = build_unit_space(tiny_model, _granularities("attention_heads", "ffn", "depth"), tiny.conditioning())
    (depth,) = [g for g in space.groups if g.kind == "depth"]
    assert depth.unit_paths == ("transformer_blocks.1", "transformer_blocks.2")  # first and last block protected
    parents = {g.path: g.parent for g in space.groups if not g.unit_paths}
    for i in range(4):
        want = f"transformer_blocks.{i}" if i in (1, 2) else None
        for part in ("attn1", "attn2", "ff"):
            assert parents[f"transformer_blocks.{i}.{part}"] == want
    # a depth unit's own MACs / parameters are what its block holds beyond the nested width units
    only_depth = build_unit_space(tiny_model, _granularities("depth"), tiny.conditioning())
    for j, p in enumerate(depth.unit_paths):
        nested = [g for g in space.groups if g.parent == p]
        whole = only_depth.groups[0].macs_of_units()[j]
        assert depth.macs_of_units()[j] == pytest.approx(whole - sum(g.macs_per_unit * g.num_units for g in nested))
        block_params = sum(t.numel() for t in tiny_model.get_submodule(p).parameters())
        assert only_depth.groups[0].params_of_units()[j] == block_params
        assert depth.params_of_units()[j] == block_params - sum(g.params_per_unit * g.num_units for g in nested)
        assert depth.params_of_units()[j] > 0  # the block's adaLN scale_shift_table stays with the block


def test_pixart_alpha_512_drops_middle_out_never_the_ends():
    backbone = DiTBackbone(DiTBackboneConfig(preset="pixart_alpha_512"))
    model = backbone.build_denoiser("meta")
    (group,) = Depth(DepthConfig()).unit_groups(model, backbone.conditioning())
    idx = [int(p.rsplit(".", 1)[1]) for p in group.unit_paths]
    assert len(idx) == 26 and idx[:4] == [13, 14, 12, 15] and idx[-2:] == [1, 26]
    assert 0 not in idx and 27 not in idx
    # blocks are identical, so every unit costs the same
    assert max(group.unit_macs) == pytest.approx(min(group.unit_macs))
    assert len(Depth(DepthConfig(protect=0)).block_paths(model)) == 28


def test_monotone_drop_order_removes_macs_step_by_step(tiny, tiny_model):
    cond = tiny.conditioning()
    space = build_unit_space(tiny_model, _granularities("depth"), cond)
    x, t, text = _inputs(cond)
    kept = []
    for k in range(space.size + 1):  # drop the first k units in priority order
        arch = torch.ones(space.size)
        arch[:k] = 0
        expert = cut_model(tiny_model, space, _granularities("depth"), arch)
        dropped = {p for p, m in expert.named_modules() if isinstance(m, SkipTransformerBlock)}
        assert dropped == set(space.groups[0].unit_paths[:k])
        kept.append(float(space.kept_macs(arch)))
        assert abs(kept[-1] / _ref_macs(expert, x, t, text) - 1) < MACS_TOL
    assert all(a > b for a, b in zip(kept, kept[1:]))


def test_depth_config_errors_say_what_to_do(tiny_model):
    with pytest.raises(ValueError, match="protect=-1 must be >= 0"):
        DepthConfig(protect=-1)
    with pytest.raises(ValueError, match="4 transformer_blocks and depth protects protect=2"):
        Depth(DepthConfig(protect=2)).block_paths(tiny_model)
    with pytest.raises(ValueError, match="transformer_blocks of BasicTransformerBlock, got Linear"):
        Depth(DepthConfig()).block_paths(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("names", [("depth",), ("attention_heads", "ffn", "depth")], ids="+".join)
def test_hard_gates_equal_physical_cuts(tiny, names):
    report = check_granularity_exactness(tiny, _granularities(*names), num_architectures=8, seed=3)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale)
    assert all(got == want for got, want in report.params)
    assert report.macs_ratios[0] == 1.0 and report.macs_ratios[1] == min(report.macs_ratios)


def test_per_sample_block_gates_have_the_outputs_rank(tiny, tiny_model):
    """Batch 3, block 1 kept / dropped / half: each sample gets its own gate, (B, 1, 1) on (B, N, C)."""
    cond = tiny.conditioning()
    grans = _granularities("depth")
    space = build_unit_space(tiny_model, grans, cond)
    x, t, text = _inputs(cond, batch=3, seed=1)
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 1.0]])  # (3, U)
    with torch.no_grad():
        dense = tiny.denoise(tiny_model, x, t, text)
        with Gates(tiny_model, space, grans) as g:
            g.set(gates)
            gated = tiny.denoise(tiny_model, x, t, text)
        dropped = tiny.denoise(cut_model(tiny_model, space, grans, torch.tensor([0.0, 1.0])), x, t, text)
    assert gated.shape == dense.shape == (3, *cond.sample_shape)
    assert torch.allclose(gated[0], dense[0], atol=1e-6)
    assert torch.allclose(gated[1], dropped[1], atol=1e-5)
    assert not torch.allclose(gated[2], gated[0], atol=1e-4) and not torch.allclose(gated[2], gated[1], atol=1e-4)


# --------------------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("names", [("depth",), ("attention_heads", "ffn", "depth")], ids="+".join)
def test_macs_agree_with_flop_counter_for_random_architectures(tiny, tiny_model, names):
    cond = tiny.conditioning()
    grans = _granularities(*names)
    space = build_unit_space(tiny_model, grans, cond)
    x, t, text = _inputs(cond)
    assert abs(space.total_macs / _ref_macs(tiny_model, x, t, text) - 1) < MACS_TOL
    for arch in random_architectures(space, 6, keep_prob=0.6, seed=5)[1:]:
        expert = cut_model(tiny_model, space, grans, arch)
        assert abs(float(space.kept_macs(arch)) / _ref_macs(expert, x, t, text) - 1) < MACS_TOL
        assert count_params(expert) == int(round(float(space.kept_params(arch))))


# -------------------------------------------------------------------------------------- a run
@pytest.mark.slow
def test_smoke_run_prunes_the_dit_with_width_and_depth(tmp_path):
    from aptp.cli import main
    from aptp.pruners.expert import read_expert_meta

    out = tmp_path / "run"
    assert main(["run", "smoke", "backbone=dit", "granularity=both", "pruner.progress=false",
                 "--output-dir", str(out)]) in (0, None)
    metas = [read_expert_meta(p) for p in sorted((out / "experts").iterdir())]
    assert metas and all(0.0 < m["macs_ratio"] <= 1.0 for m in metas)
