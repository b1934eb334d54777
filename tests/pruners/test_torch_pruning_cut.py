"""torch-pruning's dependency graph, as a second cutting backend, cuts the same expert as aptp's
granularities: same parameter shapes, same function, same parameter count as the unit space says."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import make_granularities, random_arch

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.resources import count_params
from aptp.pruners.torch_pruning_cut import cut_with_torch_pruning
from aptp.pruners.gating import Gates, build_unit_space, cut_model

WIDTH = ["resnet_channels", "attention_heads", "ffn"]


def _channel_arch(space, seed: int, p_drop: float) -> torch.Tensor:
    """(U,) random architecture keeping at least one unit of every group."""
    arch = random_arch(space.size, seed, p_drop)
    for i in range(len(space.groups)):
        sl = space.group_slice(i)
        arch[sl.start + seed % (sl.stop - sl.start)] = 1.0
    return arch


def _forward(backbone):
    return lambda model, inputs: backbone.denoise(model, *inputs)


@pytest.fixture(scope="module")
def width_space(tiny_backbone, tiny_unet):
    grans = make_granularities(WIDTH)
    return build_unit_space(tiny_unet, grans, tiny_backbone.conditioning()), grans


@pytest.mark.parametrize("seed,p_drop", [(0, 0.3), (1, 0.6), (2, 0.9)])
def test_torch_pruning_cuts_the_same_expert(seed, p_drop, tiny_backbone, tiny_unet, tiny_inputs, width_space):
    space, grans = width_space
    x, t, text = tiny_inputs
    arch = _channel_arch(space, seed, p_drop)
    ours = cut_model(tiny_unet, space, grans, arch)
    theirs = cut_with_torch_pruning(tiny_unet, space, grans, arch, (x[:1], t[:1], text[:1]), _forward(tiny_backbone))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert count_params(theirs) == round(float(space.kept_params(arch))) < space.total_params
    with torch.no_grad():
        a, b = tiny_backbone.denoise(ours, x, t, text), tiny_backbone.denoise(theirs, x, t, text)
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
    # the dense model is untouched
    assert count_params(tiny_unet) == space.total_params


def test_torch_pruning_cut_of_a_gated_model_carries_no_gates(tiny_backbone, tiny_unet, tiny_inputs, width_space):
    space, grans = width_space
    x, t, text = (a[:1] for a in tiny_inputs)
    arch = _channel_arch(space, 3, 0.5)
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(torch.zeros(space.size))  # a leaked gate would zero every unit of the expert
        expert = cut_with_torch_pruning(tiny_unet, space, grans, arch, (x, t, text), _forward(tiny_backbone))
    plain = cut_model(tiny_unet, space, grans, arch)
    with torch.no_grad():
        assert torch.equal(tiny_backbone.denoise(expert, x, t, text), tiny_backbone.denoise(plain, x, t, text))


def test_transformer_heads_and_ffn_cut_the_same():
    from aptp.backbones.transformer import DiTBackbone, DiTBackboneConfig

    bb = DiTBackbone(DiTBackboneConfig(preset="tiny"))
    model = bb.build_denoiser().eval()
    cond = bb.conditioning()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *cond.sample_shape, generator=g), torch.tensor([3, 700])
    text = torch.randn(2, cond.text_len, cond.text_dim, generator=g)
    grans = make_granularities(["attention_heads", "ffn"])
    space = build_unit_space(model, grans, cond)
    arch = _channel_arch(space, 4, 0.5)
    theirs = cut_with_torch_pruning(model, space, grans, arch, (x[:1], t[:1], text[:1]), _forward(bb))
    with torch.no_grad():
        a = bb.denoise(cut_model(model, space, grans, arch), x, t, text)
        assert float((a - bb.denoise(theirs, x, t, text)).abs().max()) <= 1e-6 * float(a.abs().max())


def test_what_torch_pruning_cannot_cut_is_refused_with_the_way_out(tiny_backbone, tiny_unet, tiny_inputs, tiny_spaces,
                                                                   width_space):
    x, t, text = (a[:1] for a in tiny_inputs)
    space, grans = tiny_spaces["all"]
    arch = torch.ones(space.size)
    depth = next(i for i, g in enumerate(space.groups) if g.unit_paths)
    arch[space.group_slice(depth).start] = 0.0
    with pytest.raises(ConfigError, match="channels only.*cut_backend: aptp"):
        cut_with_torch_pruning(tiny_unet, space, grans, arch, (x, t, text), _forward(tiny_backbone))
    space, grans = width_space
    arch = torch.ones(space.size)
    arch[space.group_slice(0)] = 0.0
    with pytest.raises(ConfigError, match="every unit.*min_units >= 1"):
        cut_with_torch_pruning(tiny_unet, space, grans, arch, (x, t, text), _forward(tiny_backbone))
    with pytest.raises(ShapeError, match="one architecture"):
        cut_with_torch_pruning(tiny_unet, space, grans, torch.ones(2, space.size), (x, t, text))


def test_a_frozen_model_is_traced_and_stays_frozen(tiny_backbone, tiny_inputs, width_space):
    """A training context holds its dense model frozen (and may trace under no_grad)."""
    space, grans = width_space
    x, t, text = (a[:1] for a in tiny_inputs)
    frozen = tiny_backbone.build_denoiser().requires_grad_(False)
    with torch.no_grad():
        expert = cut_with_torch_pruning(frozen, space, grans, _channel_arch(space, 5, 0.5), (x, t, text),
                                        _forward(tiny_backbone))
    assert count_params(expert) < space.total_params
    assert not any(p.requires_grad for p in expert.parameters())


def test_torch_pruning_group_magnitude_is_the_granularities_unit_magnitude(tiny_backbone, tiny_unet, tiny_inputs,
                                                                           width_space):
    """Two independent accountings of what a unit's cut removes: torch-pruning's coupled group
    (summed squared L2, no normaliser) and each granularity's ``unit_magnitude`` (L2)."""
    import torch_pruning as tp

    from aptp.pruners.assignments.depgraph import unit_scores
    from aptp.pruners.torch_pruning_cut import dependency_graph

    space, grans = width_space
    x, t, text = (a[:1] for a in tiny_inputs)
    graph = dependency_graph(tiny_unet, (x, t, text), _forward(tiny_backbone))
    criterion = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    theirs = unit_scores(space, grans, tiny_unet, graph, criterion)  # (U,)
    by_kind = {g.kind: g for g in grans}
    ours = torch.cat([by_kind[g.kind].unit_magnitude(tiny_unet, g).double() ** 2 for g in space.groups])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0.0)
