"""Experts on disk: save -> load without training code -> identical outputs; stock pipeline; compile."""

from __future__ import annotations

import json

import pytest
import torch
from granularity_helpers import random_arch

from aptp.core.config import config_to_dict
from aptp.pruners.expert import EXPERT_FILE, load_expert, save_expert
from aptp.pruners.gating import cut_model


def _run(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


@pytest.fixture(scope="module")
def saved_expert(tmp_path_factory, tiny_backbone, tiny_unet, tiny_spaces):
    space, grans = tiny_spaces["all"]
    arch = random_arch(space.size, 5, 0.4)
    arch[space.mask_of_kind("depth").nonzero()[:2, 0]] = 0  # drop the lowest-resolution pair
    expert = cut_model(tiny_unet, space, grans, arch)
    with torch.no_grad():  # an expert is fine-tuned after the cut: its weights are its own
        for p in expert.parameters():
            p.add_(0.01 * torch.randn_like(p))
    backbone = {"name": "unet", **config_to_dict(tiny_backbone.config)}  # the registered backbone reference
    folder = save_expert(tmp_path_factory.mktemp("expert") / "e0", expert, arch, space, grans,
                         tiny_backbone.conditioning(), backbone=backbone)
    return folder, expert, arch, space


def test_save_load_gives_identical_outputs(saved_expert, tiny_inputs):
    folder, expert, arch, space = saved_expert
    meta = json.loads((folder / EXPERT_FILE).read_text())
    assert meta["architecture"] == [int(a) for a in arch.tolist()]
    assert meta["macs_ratio"] == pytest.approx(float(space.macs_ratio(arch)))
    loaded = load_expert(folder)
    assert type(loaded).__name__ == "UNet2DConditionModel"
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in expert.parameters())
    x, t, text = tiny_inputs
    assert torch.equal(_run(loaded, x, t, text), _run(expert, x, t, text))


def test_loaded_expert_runs_in_a_stock_diffusers_pipeline(saved_expert, tiny_backbone):
    from diffusers import StableDiffusionPipeline

    folder, _, _, _ = saved_expert
    mods = tiny_backbone.load()
    pipe = StableDiffusionPipeline(vae=mods.vae, text_encoder=mods.text_encoder, tokenizer=mods.tokenizer,
                                   unet=mods.denoiser, scheduler=mods.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = load_expert(folder)
    gen = torch.Generator().manual_seed(0)
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, height=64, width=64,
               output_type="np", generator=gen)
    assert out.images.shape == (2, 64, 64, 3)
    assert bool(torch.isfinite(torch.from_numpy(out.images)).all())


def test_loaded_expert_works_under_torch_compile(saved_expert, tiny_inputs):
    folder, expert, _, _ = saved_expert
    loaded = load_expert(folder)
    compiled = torch.compile(loaded, backend="eager")  # dynamo capture; inductor needs minutes on 2 CPU cores
    x, t, text = (a[:1] for a in tiny_inputs)
    ref = _run(expert, x, t, text)
    assert torch.allclose(_run(compiled, x, t, text), ref, atol=1e-5)


def test_from_pretrained_refuses_a_cut_expert_rather_than_loading_it_wrongly(saved_expert):
    from diffusers import UNet2DConditionModel

    folder, _, _, _ = saved_expert
    with pytest.raises(Exception, match="(?i)size|shape|mismatch"):
        UNet2DConditionModel.from_pretrained(folder)


def test_load_expert_looks_names_up_in_the_registry_it_is_given(saved_expert, tiny_inputs, monkeypatch):
    """The registry is passed down (RoutedPipeline.from_run -> load_expert), not fetched from a global."""
    import aptp.core.plugins as plugins

    folder, expert, _, _ = saved_expert
    registry = plugins.load_registry()

    def no_global():
        raise AssertionError("load_expert fetched default_registry() although it was given a registry")

    monkeypatch.setattr(plugins, "default_registry", no_global)
    loaded = load_expert(folder, registry=registry)
    x, t, text = tiny_inputs
    assert torch.equal(_run(loaded, x, t, text), _run(expert, x, t, text))
