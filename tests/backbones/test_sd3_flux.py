"""The built-in 'sd3' and 'flux' backbones: diffusers' SD3Transformer2DModel and FluxTransformer2DModel
pruned by the generic attention_heads / ffn / depth granularities (joint attention, FLUX's fused single
blocks, whole blocks), analytic MACs against FlopCounterMode (tiny random models, and the published
SD3-medium / FLUX.1-dev configs on the meta device), experts in the stock diffusers pipelines, and
APTP / static runs end to end on the tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aptp.backbones import flow
from aptp.backbones.flux import FluxBackbone, FluxBackboneConfig, pack_latents, unpack_latents
from aptp.backbones.sd3 import SD3Backbone, SD3BackboneConfig
from aptp.core.config import config_to_dict
from aptp.core.errors import ConfigError
from aptp.core.interfaces import Conditioning
from aptp.core.plugins import default_registry
from aptp.core.resources import count_params, flop_counter_macs
from aptp.pruners.expert import load_expert, save_expert
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.testing import check_backbone, check_component, check_granularity_exactness, random_architectures

MACS_TOL = 0.005  # 0.5 %
ALL = ("attention_heads", "ffn", "depth")


def _granularities(*names: str):
    reg = default_registry()["granularity"]
    return [reg.get(n).build() for n in names]


def _tiny(name: str):
    return SD3Backbone(SD3BackboneConfig()) if name == "sd3" else FluxBackbone(FluxBackboneConfig())


def _reference_macs(backbone, model, cond, device: str = "cpu") -> int:
    x = torch.zeros(1, *cond.sample_shape, device=device)
    t = torch.full((1,), 500.0, device=device)
    text = torch.zeros(1, cond.text_len, cond.text_dim, device=device)
    return flop_counter_macs(backbone.denoise, model, x, t, text)


# ----------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name, cls", [("sd3", SD3Backbone), ("flux", FluxBackbone)])
def test_registered_as_builtins_and_pass_the_contract(name, cls):
    spec = default_registry()["backbone"].get(name)
    assert spec.factory is cls and spec.distribution is not None and spec.distribution.startswith("aptp ")
    check_component(spec)


def test_tiny_shapes_resolution_and_config_errors():
    assert SD3Backbone(SD3BackboneConfig()).conditioning() == Conditioning((4, 8, 8), 1 + 16 + 16, 64)
    assert FluxBackbone(FluxBackboneConfig()).conditioning() == Conditioning((4, 8, 8), 1 + 16, 64)
    assert SD3Backbone(SD3BackboneConfig(resolution=32)).conditioning().sample_shape == (4, 16, 16)
    assert FluxBackbone(FluxBackboneConfig(resolution=32, text_len=4)).conditioning() == Conditioning((4, 16, 16), 5, 64)
    with pytest.raises(ConfigError, match="not a multiple of the VAE factor 2"):
        SD3Backbone(SD3BackboneConfig(resolution=17)).conditioning()
    with pytest.raises(ConfigError, match="does not divide into 2x2 patches"):
        FluxBackbone(FluxBackboneConfig(resolution=18)).conditioning()
    with pytest.raises(ValueError, match="preset='flux_dev' is unknown"):
        SD3BackboneConfig(preset="flux_dev")
    with pytest.raises(ValueError, match="guidance=-1"):
        FluxBackboneConfig(guidance=-1)
    with pytest.raises(ConfigError, match="no folder"):
        SD3Backbone(SD3BackboneConfig(pretrained="./no/such/folder")).conditioning()


def test_text_and_latents_pack_as_the_pipelines_do():
    pooled, seq = torch.randn(2, 5), torch.randn(2, 3, 8)
    text = flow.pack_text(pooled, seq)  # (2, 4, 8)
    assert text.shape == (2, 4, 8) and bool((text[:, 0, 5:] == 0).all())
    p, s = flow.unpack_text(text, 5)
    assert torch.equal(p, pooled) and torch.equal(s, seq)
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)


def test_flow_backbones_give_the_rectified_flow_training_view():
    backbone = SD3Backbone(SD3BackboneConfig())
    sched = backbone._scheduler()
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"  # diffusers' own, no stand-in
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    s = (t / 1000.0).view(-1, 1, 1, 1)
    assert torch.allclose(backbone.add_noise(sched, x0, eps, t), (1 - s) * x0 + s * eps)
    assert torch.equal(backbone.training_target(sched, x0, eps, t), eps - x0)
    snr = backbone.snr(sched, t)  # ((1 - sigma) / sigma)^2
    assert math.isinf(float(snr[0])) and math.isclose(float(snr[1]), 1.0, rel_tol=1e-5)
    assert math.isclose(float(snr[2]), (0.001 / 0.999) ** 2, rel_tol=1e-3)
    w = backbone.loss_weights(sched, t, 5.0)  # Min-SNR for a velocity target: min(SNR, 5) / (SNR + 1)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, float(snr[2] / (snr[2] + 1))]))
    assert torch.equal(backbone.loss_weights(sched, t, None), torch.ones(3))
    assert type(flow.stock_scheduler(sched)).__name__ == "FlowMatchEulerDiscreteScheduler"


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("names", [("attention_heads",), ("ffn",), ("depth",), ALL], ids="+".join)
def test_hard_gates_equal_physical_cuts(name, names):
    report = check_granularity_exactness(_tiny(name), _granularities(*names), num_architectures=5)
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale)
    assert all(got == want for got, want in report.params)
    assert report.macs_ratios[0] == 1.0 and report.macs_ratios[1] < 0.7  # the empty architecture


def test_unit_spaces_of_the_tiny_models():
    sd3, fl = _tiny("sd3"), _tiny("flux")
    space = build_unit_space(sd3.build_denoiser(), _granularities(*ALL), sd3.conditioning())
    sizes = {k: sum(g.num_units for g in space.groups if g.kind == k) for k in space.kinds()}
    assert sizes == {"attention_heads": 4 * 4, "ffn": (4 + 3) * 32, "depth": 2}  # SD3's last block: no ff_context
    heads = next(g for g in space.groups if g.path == "transformer_blocks.0.attn")
    c, d = 64, 16  # a joint head owns its rows of 6 projections (with bias) and its columns of 2 outputs
    assert heads.meta["attention"] == "joint" and heads.params_per_unit == d * 6 * (c + 1) + d * 2 * c
    assert heads.meta["key_len"] == 16 + 32  # image tokens (4x4 patches) + text tokens
    depth = next(g for g in space.groups if g.kind == "depth")
    assert depth.unit_paths == ("transformer_blocks.1", "transformer_blocks.2")

    space = build_unit_space(fl.build_denoiser(), _granularities(*ALL), fl.conditioning())
    sizes = {k: sum(g.num_units for g in space.groups if g.kind == k) for k in space.kinds()}
    assert sizes == {"attention_heads": (3 + 4) * 4, "ffn": (3 * 2 + 4) * 32, "depth": 3}
    depth = next(g for g in space.groups if g.kind == "depth")
    # middle-out over 3 double + 4 single blocks; never the first or last block of either stack
    assert depth.unit_paths == ("single_transformer_blocks.1", "transformer_blocks.1", "single_transformer_blocks.2")
    fused = [g for g in space.groups if g.path == "single_transformer_blocks.1"]
    assert [g.kind for g in fused] == ["ffn"] and fused[0].parent == "single_transformer_blocks.1"


# -------------------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_tiny_analytic_macs_equal_flop_counter_dense_and_cut(name):
    backbone = _tiny(name)
    model, cond, grans = backbone.build_denoiser(), backbone.conditioning(), _granularities(*ALL)
    space = build_unit_space(model, grans, cond)
    ref = _reference_macs(backbone, model, cond)
    assert abs(space.total_macs / ref - 1) < MACS_TOL, (space.total_macs, ref)
    for arch in random_architectures(space, 5, 0.5, seed=2)[1:]:
        cut = cut_model(model, space, grans, arch)
        got = _reference_macs(backbone, cut, cond)
        assert abs(float(space.kept_macs(arch)) / got - 1) < MACS_TOL, (float(space.kept_macs(arch)), got)


@pytest.mark.parametrize("backbone, params, units, macs", [
    (SD3Backbone(SD3BackboneConfig(preset="sd3_medium")), 2_028_328_000,
     {"attention_heads": 24 * 24, "ffn": (24 + 23) * 32, "depth": 22}, 4.452e12),
    (FluxBackbone(FluxBackboneConfig(preset="flux_dev")), 11_901_408_320,
     {"attention_heads": (19 + 38) * 24, "ffn": (19 * 2 + 38) * 32, "depth": 53}, 3.719e13),
], ids=["sd3_medium", "flux_dev"])
def test_published_configs_on_meta(backbone, params, units, macs):
    """SD3-medium (2.0 B) and FLUX.1-dev (11.9 B) at 1024 px, shapes only: parameter count, unit space,
    and analytic MACs against FlopCounterMode on the meta device (dense and one cut)."""
    info = check_backbone(backbone, batch=1)
    assert info["num_params"] == params
    model, cond, grans = backbone.build_denoiser("meta"), backbone.conditioning(), _granularities(*ALL)
    assert cond.sample_shape == (16, 128, 128)
    space = build_unit_space(model, grans, cond)
    assert {k: sum(g.num_units for g in space.groups if g.kind == k) for k in space.kinds()} == units
    assert abs(space.total_macs / macs - 1) < 0.001
    ref = _reference_macs(backbone, model, cond, "meta")
    assert abs(space.total_macs / ref - 1) < MACS_TOL, (space.total_macs, ref)
    arch = random_architectures(space, 3, 0.5, seed=0)[2]
    cut = cut_model(model, space, grans, arch)
    assert abs(float(space.kept_macs(arch)) / _reference_macs(backbone, cut, cond, "meta") - 1) < MACS_TOL
    assert count_params(cut) == int(round(float(space.kept_params(arch))))
    depth = next(g for g in space.groups if g.kind == "depth")
    first_last = {f"{s}.{i}" for s, n in (("transformer_blocks", model.config.num_layers),
                                         ("single_transformer_blocks", getattr(model.config, "num_single_layers", 0)))
                  if n for i in (0, n - 1)}
    assert not first_last & set(depth.unit_paths)


# -------------------------------------------------------------------------- parts and experts
@pytest.fixture(scope="module")
def loaded():
    return {name: (b := _tiny(name), b.load()) for name in ("sd3", "flux")}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_encodes_prompts_and_generates(loaded, name):
    backbone, modules = loaded[name]
    cond = backbone.conditioning()
    text = backbone.encode_prompts(modules, ["a red circle", "two small blue squares"])
    assert text.shape == (2, cond.text_len, cond.text_dim)
    latents = torch.randn(2, *cond.sample_shape, generator=torch.Generator().manual_seed(0))
    a = backbone.generate(modules, ["a red circle", "a square"], num_inference_steps=2, guidance_scale=2.0,
                          latents=latents)
    b = backbone.generate(modules, ["a red circle", "a square"], num_inference_steps=2, guidance_scale=2.0,
                          latents=latents)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def _stock_pipeline(name: str, modules, transformer):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    parts = {"scheduler": flow.stock_scheduler(modules.scheduler), "vae": modules.vae,
             "text_encoder": modules.text_encoder, "tokenizer": modules.tokenizer,
             "text_encoder_2": modules.extra["text_encoder_2"], "tokenizer_2": modules.extra["tokenizer_2"]}
    if name == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=transformer, text_encoder_3=modules.extra["text_encoder_3"],
                                        tokenizer_3=modules.extra["tokenizer_3"], **parts)
    else:
        pipe = FluxPipeline(transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cut_expert_saves_loads_and_runs_in_the_stock_pipeline(loaded, name, tmp_path):
    backbone, modules = loaded[name]
    grans, cond = _granularities(*ALL), backbone.conditioning()
    space = build_unit_space(modules.denoiser, grans, cond)
    arch = random_architectures(space, 3, 0.5, seed=3)[2]
    expert = cut_model(modules.denoiser, space, grans, arch)
    folder = save_expert(tmp_path / "e0", expert, arch, space, grans, cond,
                         backbone={"name": name, **config_to_dict(backbone.config)})
    loaded_expert = load_expert(folder)
    assert type(loaded_expert) is type(modules.denoiser) and count_params(loaded_expert) == count_params(expert)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, *cond.sample_shape, generator=g), torch.randn(2, cond.text_len, cond.text_dim, generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert torch.equal(backbone.denoise(expert, x, t, text), backbone.denoise(loaded_expert, x, t, text))
    pipe = _stock_pipeline(name, modules, loaded_expert)
    kwargs = {"guidance_scale": 3.0} if name == "sd3" else {"guidance_scale": 3.5}
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2, height=16, width=16, output_type="np",
               max_sequence_length=16, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.images.shape == (2, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(out.images)).all())
    # the backbone's sampler is the stock pipeline: same latents, same images
    pipe.transformer = expert
    lat = torch.randn(1, *cond.sample_shape, generator=torch.Generator().manual_seed(1))
    mine = backbone.generate(modules, ["a red circle"], denoiser=expert, num_inference_steps=2, guidance_scale=1.0,
                             latents=lat)
    stock = pipe(["a red circle"], num_inference_steps=2, height=16, width=16, output_type="pt",
                 max_sequence_length=16, latents=lat if name == "sd3" else pack_latents(lat),
                 guidance_scale=1.0 if name == "sd3" else backbone.config.guidance).images
    assert torch.allclose(mine, stock, atol=1e-5)


def test_sd3_loads_a_saved_pipeline_folder(loaded, tmp_path):
    backbone, modules = loaded["sd3"]
    pipe = _stock_pipeline("sd3", modules, modules.denoiser)
    pipe.save_pretrained(str(tmp_path))
    again = SD3Backbone(SD3BackboneConfig(pretrained=str(tmp_path), text_len=16))
    parts = again.load()
    assert again.conditioning() == Conditioning((4, 8, 8), 1 + 16 + 16, 64)  # the saved CLIP tokenizer's length
    for (n, a), (_, b) in zip(modules.denoiser.state_dict().items(), parts.denoiser.state_dict().items()):
        assert torch.equal(a, b), n
    assert type(parts.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and parts.extra["text_encoder_3"] is not None
    prompts = ["a red circle", "two small blue squares on the left"]
    assert torch.allclose(again.encode_prompts(parts, prompts), backbone.encode_prompts(modules, prompts), atol=1e-5)


# ------------------------------------------------------------------------------ end to end
def _run(tmp_path, overrides: list[str]):
    from aptp.core.build import build
    from aptp.core.config import load_experiment

    cfg = load_experiment("smoke", ["pruner.progress=false", *overrides])
    composition = build(cfg)
    return composition.pruner.run(composition, tmp_path)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_aptp_and_static_runs_end_to_end(name, tmp_path):
    summary = _run(tmp_path / "aptp", [f"backbone={name}", "pruner.steps=3", "pruner.warmup_steps=1",
                                       "pruner.phase2.steps=1", "pruner.phase2.batch_size=2", "pruner.batch_size=4",
                                       "pruner.data.num_samples=8"])
    assert len(summary["expert_macs_ratios"]) == 2
    log = [json.loads(line) for line in (tmp_path / "aptp" / "phase1.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    summary = _run(tmp_path / "static", [f"backbone={name}", "pruner=static", "router=single",
                                         "assignment=magnitude", "pruner.finetune.steps=2",
                                         "pruner.finetune.batch_size=2", "pruner.data.num_samples=4"])
    (ratio,) = summary["expert_macs_ratios"]
    assert ratio <= 0.6 + 1e-6
    expert = load_expert(tmp_path / "static" / "experts" / "expert-0")
    backbone = _tiny(name)
    cond = backbone.conditioning()
    out = backbone.denoise(expert, torch.randn(1, *cond.sample_shape), torch.tensor([500.0]),
                           torch.randn(1, cond.text_len, cond.text_dim))
    assert out.shape == (1, *cond.sample_shape) and bool(torch.isfinite(out).all())
