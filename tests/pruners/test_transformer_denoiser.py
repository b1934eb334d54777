"""The width granularities are generic over diffusers module types: a PixArt-style transformer
denoiser (``PixArtTransformer2DModel``) gets the same gates, cuts and MACs model as the UNet."""

from __future__ import annotations

import pytest
import torch
from granularity_helpers import make_granularities, random_arch

from aptp.core.interfaces import Conditioning
from aptp.core.resources import flop_counter_macs
from aptp.pruners.gating import Gates, build_unit_space, cut_model


@pytest.fixture(scope="module")
def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                     in_channels=4, out_channels=8, cross_attention_dim=32, caption_channels=16,
                                     patch_size=2, norm_type="ada_norm_single").eval()
    return model, Conditioning((4, 8, 8), 7, 16)


def _run(model, x, t, text):
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def test_pixart_heads_and_ffn_gate_cut_and_count(pixart):
    model, cond = pixart
    grans = make_granularities(["attention_heads", "ffn"])
    space = build_unit_space(model, grans, cond)
    assert space.size == 2 * (4 + 4) + 2 * 32  # 2 blocks x (self + cross heads) + 2 FFNs x 32 groups
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *cond.sample_shape, generator=g)
    text = torch.randn(1, cond.text_len, cond.text_dim, generator=g)
    t = torch.tensor([500])
    dense_macs = flop_counter_macs(model, x, encoder_hidden_states=text, timestep=t,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    assert abs(space.total_macs / dense_macs - 1) < 0.005
    scale = float(_run(model, x, t, text).abs().max())
    for seed, p in [(0, 0.3), (1, 0.6), (2, 0.9)]:
        arch = random_arch(space.size, seed, p)
        with Gates(model, space, grans) as gates:
            gates.set(arch)
            gated = _run(model, x, t, text)
        expert = cut_model(model, space, grans, arch)
        assert float((gated - _run(expert, x, t, text)).abs().max()) <= 1e-5 * scale
        ref = flop_counter_macs(expert, x, encoder_hidden_states=text, timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        assert abs(float(space.kept_macs(arch)) / ref - 1) < 0.005


def test_depth_on_two_blocks_has_nothing_to_drop_and_says_so(pixart):
    """depth protects the first and last transformer block: a 2-block model has no depth unit."""
    model, cond = pixart
    with pytest.raises(ValueError, match="2 transformer_blocks and depth protects protect=1"):
        build_unit_space(model, make_granularities(["depth"]), cond)
