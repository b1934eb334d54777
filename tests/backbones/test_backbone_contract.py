"""The backbone owns calling, sampling, the training target and the MACs tracer's call of its model."""

from __future__ import annotations

import pytest
import torch

import aptp  # noqa: F401  (before diffusers)
from aptp.backbones.diffusers_base import DiffusersBackbone, attention_types, register_diffusers_macs
from aptp.backbones.flux import FluxBackbone, FluxBackboneConfig
from aptp.backbones.sd3 import SD3Backbone, SD3BackboneConfig
from aptp.backbones.transformer import DiTBackbone, DiTBackboneConfig
from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.interfaces import Conditioning
from aptp.core.resources import key_length, macs_formula
from aptp.pruners.granularities.toolkit import trace

BACKBONES = {
    "unet": lambda: UNetBackbone(UNetBackboneConfig()),
    "dit": lambda: DiTBackbone(DiTBackboneConfig()),
    "sd3": lambda: SD3Backbone(SD3BackboneConfig()),
    "flux": lambda: FluxBackbone(FluxBackboneConfig()),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_conditioning_carries_the_backbones_call(name):
    bb = BACKBONES[name]()
    cond = bb.conditioning()
    assert isinstance(bb, DiffusersBackbone)
    assert cond.call == bb.trace_call  # the tracer calls the model as the backbone does
    bare = Conditioning(cond.sample_shape, cond.text_len, cond.text_dim)
    assert bare == cond and hash(bare) == hash(cond)  # the call takes no part in equality


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_transformer_with_its_own_call_convention_traces_only_through_its_backbone(name):
    """SD3 / FLUX need pooled projections (and FLUX packed latents): no guessed signature calls them."""
    bb = BACKBONES[name]()
    denoiser = bb.build_denoiser("meta")
    assert trace(denoiser, bb.conditioning()).total_macs > 0
    cond = bb.conditioning()
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error for the missing inputs
        trace(denoiser, Conditioning(cond.sample_shape, cond.text_len, cond.text_dim))


def test_the_diffusers_attentions_are_taught_to_the_tracer_by_the_backbone_room():
    register_diffusers_macs()
    from diffusers.models.attention_processor import Attention

    attn = Attention(8, heads=2, dim_head=4)
    assert isinstance(attn, attention_types())
    assert macs_formula(attn) is not None and key_length(attn) is not None


def test_training_targets():
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    flux = BACKBONES["flux"]()
    assert torch.equal(flux.training_target(flux._scheduler(), x0, noise, t), noise - x0)  # velocity eps - x0
    unet = BACKBONES["unet"]()
    sched = unet._scheduler()
    kind = sched.config.prediction_type
    want = sched.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    assert torch.equal(unet.training_target(sched, x0, noise, t), want)
    from diffusers import DDIMScheduler

    for kind, want in [("epsilon", noise), ("sample", x0)]:
        assert torch.equal(unet.training_target(DDIMScheduler(prediction_type=kind), x0, noise, t), want)


def test_initial_latents_are_checked():
    from aptp.core.errors import ShapeError

    bb = BACKBONES["unet"]()
    with pytest.raises(ShapeError, match="latents must have shape"):
        bb.initial_latents(2, torch.zeros(1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    assert bb.initial_latents(2, generator=g).shape == (2, *bb.conditioning().sample_shape)
