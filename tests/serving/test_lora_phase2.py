"""Phase 2 with LoRA adapters: a few steps on the smoke backbone change the expert, which is saved
as index sets over the dense weights plus rank-r factors (or materialised with them merged)."""

from __future__ import annotations

import pytest
import torch

from aptp.core.build import build
from aptp.core.config import load_experiment
from aptp.pruners.expert import SharedExpert, load_expert, read_expert_meta
from aptp.pruners.gating import uniform_architecture
from aptp.pruners.training import DataConfig, TrainContext

# (after aptp: its import makes a torchvision built for another torch importable, which peft imports)
pytest.importorskip("peft", reason="the LoRA phase 2 needs the [lora] extra (pip install 'aptp[lora]')")


def _run(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("storage", ["shared", "materialised"])
def test_lora_phase2_trains_adapters_and_changes_the_expert(tmp_path, storage):
    composition = build(load_experiment("smoke", ["backbone.resolution=16", "pruner.progress=false"]))
    ctx = TrainContext(composition, DataConfig(num_samples=8), tmp_path, progress=False)
    arch = uniform_architecture(ctx.unit_space, 0.6)
    cut = ctx.cut(arch)
    ctx.finetune_expert(0, arch, torch.arange(8), steps=3, batch_size=4, lr=1e-2, weights=(1.0, 0.2, 0.2),
                        checkpoint_every=10, adapter="lora", lora_rank=2, storage=storage)
    folder = tmp_path / "experts" / "expert-0"
    meta = read_expert_meta(folder)
    assert meta["extra"] == {"adapter": "lora", "lora_rank": 2}
    x, t, text = ctx.example_inputs()
    materialised = load_expert(folder, dense=ctx.denoiser)
    assert type(materialised).__name__ == "UNet2DConditionModel"
    assert not torch.allclose(_run(materialised, x, t, text), _run(cut, x, t, text), atol=1e-6)
    if storage == "shared":
        assert meta["storage"] == "shared"
        shared = load_expert(folder, dense=ctx.denoiser, materialise=False)
        assert isinstance(shared, SharedExpert)
        names = [k for k in shared.own._buffers if not k.startswith("index")]  # (index sets: small integers)
        assert names and all(k.startswith(("A__", "B__")) for k in names)  # only the adapters, no full diffs
        assert torch.allclose(_run(shared, x, t, text), _run(materialised, x, t, text), atol=1e-5, rtol=0)
    ctx.gates.remove()


def test_an_unknown_adapter_is_refused_before_training(tmp_path):
    composition = build(load_experiment("smoke", ["backbone.resolution=16", "pruner.progress=false"]))
    ctx = TrainContext(composition, DataConfig(num_samples=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="adapter='dora' is unknown"):
        ctx.finetune_expert(0, uniform_architecture(ctx.unit_space, 0.6), torch.arange(4), steps=1, batch_size=2,
                            lr=1e-3, weights=(1.0, 0.0, 0.0), adapter="dora")
