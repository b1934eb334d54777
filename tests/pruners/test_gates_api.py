"""Gate batching rules, errors and registration of the granularities."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import random_arch

from aptp.core.config import compose
from aptp.core.errors import ConfigError, ShapeError
from aptp.core.plugins import default_registry
from aptp.pruners.gating import Gates, build_unit_space, cut_model


def _run(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


def test_gate_rows_tile_under_classifier_free_guidance(tiny_unet, tiny_inputs, tiny_spaces):
    space, grans = tiny_spaces["all"]
    x, t, text = tiny_inputs
    archs = torch.stack([random_arch(space.size, 1, 0.3), random_arch(space.size, 2, 0.6)])  # (2, U)
    x2, t2 = torch.cat([x[:2], x[:2]]), torch.cat([t[:2], t[:2]])
    text2 = torch.cat([torch.zeros_like(text[:2]), text[:2]])  # cat([uncond, cond]) as diffusers does
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(archs)
        tiled = _run(tiny_unet, x2, t2, text2)  # batch 4, gates batch 2
        gates.set(torch.cat([archs, archs]))
        explicit = _run(tiny_unet, x2, t2, text2)
    assert torch.equal(tiled, explicit)


def test_gate_batch_mismatch_is_a_shape_error(tiny_unet, tiny_inputs, tiny_spaces):
    space, grans = tiny_spaces["ffn"]
    x, t, text = tiny_inputs  # batch 3
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(torch.ones(2, space.size))
        with pytest.raises(ShapeError, match="batch 2"):
            _run(tiny_unet, x, t, text)
        with pytest.raises(ShapeError, match=str(space.size)):
            gates.set(torch.ones(3, space.size + 1))


def test_cut_model_checks_its_inputs(tiny_unet, tiny_spaces):
    space, grans = tiny_spaces["all"]
    with pytest.raises(ShapeError):
        cut_model(tiny_unet, space, grans, torch.ones(2, space.size))
    with pytest.raises(ConfigError, match="no granularity 'depth'"):
        cut_model(tiny_unet, space, [g for g in grans if g.kind != "depth"], torch.ones(space.size))


def test_granularities_are_registered_and_presets_compose(tiny_backbone, tiny_unet):
    reg = default_registry()
    assert {"resnet_channels", "attention_heads", "ffn", "depth"} <= set(reg["granularity"].names())
    assert "unet" in reg["backbone"]
    sizes = {}
    for preset in ("resnet_channels", "attention_heads", "ffn", "depth", "width", "both"):
        cfg = compose({"defaults": [{"granularity": preset}, {"backbone": "tiny"}]})
        grans = []
        for section in cfg.granularity:
            spec = reg["granularity"].get(section["name"])
            params = {k: v for k, v in section.items() if k != "name"}
            grans.append(spec.build(spec.config_class(**params)))
        sizes[preset] = build_unit_space(tiny_unet, grans, tiny_backbone.conditioning()).size
    assert sizes["width"] == sizes["resnet_channels"] + sizes["attention_heads"] + sizes["ffn"]
    assert sizes["both"] == sizes["width"] + sizes["depth"]


def test_bad_granularity_configs_say_what_to_do():
    from aptp.pruners.granularities import AttentionHeadsConfig, DepthConfig, FFNConfig

    with pytest.raises(ValueError, match="which='all'"):
        AttentionHeadsConfig(which="all")
    with pytest.raises(ValueError, match="num_units=0"):
        FFNConfig(num_units=0)
    with pytest.raises(ValueError, match="no units"):
        DepthConfig(resnets=False, transformers=False)


def test_ffn_units_must_divide_width(tiny_backbone, tiny_unet):
    from aptp.pruners.granularities import FFN, FFNConfig

    with pytest.raises(ValueError, match="num_units=7"):
        build_unit_space(tiny_unet, [FFN(FFNConfig(num_units=7))], tiny_backbone.conditioning())


def test_soft_gates_get_gradients_for_every_kind(tiny_unet, tiny_inputs, tiny_spaces):
    """Training path: soft per-sample gates (B, U) receive gradients through every granularity."""
    space, grans = tiny_spaces["all"]
    x, t, text = (a[:2] for a in tiny_inputs)
    g = torch.full((2, space.size), 0.7, requires_grad=True)
    with Gates(tiny_unet, space, grans) as gates:
        gates.set(g)
        y = tiny_unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        (y ** 2).mean().backward()
    assert g.grad is not None
    for kind in space.kinds():
        assert float(g.grad[:, space.mask_of_kind(kind)].abs().sum()) > 0, kind
    tiny_unet.zero_grad(set_to_none=True)


def test_unit_magnitude_and_params_per_unit(tiny_unet, tiny_spaces):
    """Magnitude of unit 0 = norm of its weight slices; cutting one unit removes params_per_unit."""
    import copy

    from aptp.pruners.granularities.toolkit import get_module

    def norm(*ts):
        return float(sum(t.detach().pow(2).sum() for t in ts).sqrt())

    for kind in ("resnet_channels", "attention_heads", "ffn"):
        space, (gran,) = tiny_spaces[kind]
        group = space.groups[1]
        mag = gran.unit_magnitude(tiny_unet, group)
        assert mag.shape == (group.num_units,) and bool((mag > 0).all())
        m = get_module(tiny_unet, group.path)
        if kind == "resnet_channels":
            s = m.conv1.out_channels // group.num_units
            want = norm(m.conv1.weight[:s], m.time_emb_proj.weight[:s], m.conv2.weight[:, :s])
        elif kind == "attention_heads":
            s = m.to_q.out_features // m.heads
            want = norm(m.to_q.weight[:s], m.to_k.weight[:s], m.to_v.weight[:s], m.to_out[0].weight[:, :s])
        else:
            f = m.net[2].in_features
            s = f // group.num_units
            w = m.net[0].proj.weight
            want = norm(w[:s], w[f:f + s], m.net[2].weight[:, :s])
        assert float(mag[0]) == pytest.approx(want, rel=1e-5), kind
        keep = torch.ones(group.num_units, dtype=torch.bool)
        keep[0] = False
        cut = copy.deepcopy(tiny_unet)
        gran.cut(cut, group, keep)
        removed = sum(p.numel() for p in tiny_unet.parameters()) - sum(p.numel() for p in cut.parameters())
        assert removed == group.params_per_unit, kind
