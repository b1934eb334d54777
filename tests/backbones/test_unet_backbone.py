"""The UNet backbone: presets, random builds, pretrained folders (SD layout and pixel-space world)."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.config import compose
from aptp.core.errors import ConfigError
from aptp.core.interfaces import Conditioning
from aptp.core.plugins import default_registry


def test_presets_compose_and_build():
    reg = default_registry()
    for preset, shape in (("tiny", (4, 32, 32)), ("sd21", (4, 32, 32))):  # sd21 preset: 256 px
        cfg = compose({"defaults": [{"backbone": preset}]})
        spec = reg["backbone"].get(cfg.backbone["name"])
        bb = spec.build(spec.config_class(**{k: v for k, v in cfg.backbone.items() if k != "name"}))
        assert isinstance(bb, UNetBackbone)
        assert bb.conditioning() == Conditioning(shape, 77, 32 if preset == "tiny" else 1024)


def test_sd21_on_meta_has_the_published_shape():
    bb = UNetBackbone(UNetBackboneConfig(preset="sd21"))
    assert bb.conditioning() == Conditioning((4, 96, 96), 77, 1024)  # 768 px default
    unet = bb.build_denoiser("meta")
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert all(p.is_meta for p in unet.parameters())
    assert [m.transformer_blocks[0].attn1.heads for m in unet.down_blocks[0].attentions] == [5, 5]


def test_tiny_loads_every_part_and_encodes_prompts():
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny"))
    mods = bb.load()
    assert mods.vae is not None and mods.text_encoder is not None and mods.tokenizer is not None
    text = bb.encode_prompts(mods, ["a red circle", "two blue squares"])
    cond = bb.conditioning()
    assert text.shape == (2, cond.text_len, cond.text_dim)
    assert not torch.equal(text[0], text[1])
    x = torch.randn(2, *cond.sample_shape)
    y = bb.denoise(mods.denoiser, x, torch.tensor([1, 999]), text)
    assert y.shape == x.shape
    # random builds are seeded
    again = UNetBackbone(UNetBackboneConfig(preset="tiny")).build_denoiser()
    assert all(torch.equal(a, b) for a, b in zip(mods.denoiser.parameters(), again.parameters()))


def test_random_sd21_has_no_text_encoder_unless_asked():
    bb = UNetBackbone(UNetBackboneConfig(preset="sd21"))
    assert bb._text_kind() == "none"
    with pytest.raises(ConfigError, match="text_encoder"):
        from aptp.core.interfaces import BackboneModules

        bb.encode_prompts(BackboneModules(torch.nn.Identity(), None), ["x"])


def test_loads_a_pixel_space_world_folder_with_minilm(tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    world = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384, attention_head_dim=2, norm_num_groups=8,
    )
    world.save_pretrained(tmp_path / "unet")
    DDIMScheduler(prediction_type="epsilon").save_pretrained(tmp_path / "scheduler")
    bb = UNetBackbone(UNetBackboneConfig(pretrained=str(tmp_path), text_encoder="minilm", vae=None, text_len=16))
    assert bb.conditioning() == Conditioning((3, 32, 32), 16, 384)
    mods = bb.load()
    assert mods.vae is None and isinstance(mods.scheduler, DDIMScheduler)
    assert all(torch.equal(a, b) for a, b in zip(world.parameters(), mods.denoiser.parameters()))
    text = bb.encode_prompts(mods, ["a small red circle top left"])
    assert text.shape == (1, 16, 384)
    y = bb.denoise(mods.denoiser, torch.randn(1, 3, 32, 32), torch.tensor([3]), text)
    assert y.shape == (1, 3, 32, 32)


def test_bad_config_values_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="preset='sd15'"):
        UNetBackboneConfig(preset="sd15")
    with pytest.raises(ValueError, match="text_encoder='t5'"):
        UNetBackboneConfig(text_encoder="t5")
    with pytest.raises(ValueError, match="vae='yes'"):
        UNetBackboneConfig(vae="yes")
    with pytest.raises(ConfigError, match="unet/config.json"):
        UNetBackbone(UNetBackboneConfig(pretrained=str(tmp_path))).conditioning()


def test_loads_a_saved_stable_diffusion_folder(tmp_path):
    """pretrained=<diffusers pipeline folder>: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import StableDiffusionPipeline

    tiny = UNetBackbone(UNetBackboneConfig(preset="tiny"))
    mods = tiny.load()
    pipe = StableDiffusionPipeline(vae=mods.vae, text_encoder=mods.text_encoder, tokenizer=mods.tokenizer,
                                   unet=mods.denoiser, scheduler=mods.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    bb = UNetBackbone(UNetBackboneConfig(pretrained=str(tmp_path)))
    assert bb.conditioning() == tiny.conditioning()
    loaded = bb.load()
    assert loaded.vae is not None and type(loaded.scheduler) is type(mods.scheduler)
    for a, b in ((mods.denoiser, loaded.denoiser), (mods.vae, loaded.vae), (mods.text_encoder, loaded.text_encoder)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    prompts = ["a red circle"]
    assert torch.equal(tiny.encode_prompts(mods, prompts), bb.encode_prompts(loaded, prompts))
    pixel = UNetBackbone(UNetBackboneConfig(pretrained=str(tmp_path), vae=None))
    assert pixel.load().vae is None and pixel.conditioning().sample_shape == (4, 32, 32)
