"""Backbone over FLUX.1 (diffusers ``FluxTransformer2DModel``: double-stream MMDiT blocks, then
single-stream blocks over the concatenated text and image tokens), with ``FluxPipeline``'s
conventions: rectified flow (``FlowMatchEulerDiscreteScheduler`` with resolution-dependent shift),
latents *packed* into 2x2 patches ((B, C, H, W) -> (B, H/2 W/2, 4 C) with 3-axis rotary position ids),
text from CLIP-L (pooled (B, 768)) and T5-XXL (B, 512, 4096), an optional guidance embedding (FLUX.1-dev
is guidance-distilled: ``guidance`` is an input, not classifier-free guidance), a 16-channel VAE with
a shift.

aptp's generic granularities prune it: ``attention_heads`` (the double blocks' joint attention: each
head's rows of ``to_q/k/v`` and ``add_q/k/v_proj``, its columns of ``to_out[0]`` and ``to_add_out``;
the single blocks' attention: ``to_q/k/v`` rows and the head's columns of the fused ``proj_out``),
``ffn`` (``ff`` / ``ff_context`` of the double blocks; the single blocks' ``proj_mlp`` rows and their
columns of ``proj_out``) and ``depth`` (whole blocks, middle-out over the 19 + 38 blocks, never the
first and last block of either stack).

The Backbone contract stays in image layout: ``denoise`` takes sample (B, C, H, W) with C =
``in_channels / 4``, packs it, and unpacks the prediction. Timesteps are ``sigma * 1000`` like the
other backbones (the transformer gets ``sigma``, as from ``FluxPipeline``). Text is one tensor
``(B, 1 + L_t5, 4096)`` whose row 0 is the pooled CLIP vector (:func:`aptp.backbones.flow.pack_text`).

Presets (``configs/backbone/flux.yaml``): ``tiny`` (3 double + 4 single blocks of width 64 with a
guidance embedding, a tiny VAE, tiny random CLIP / T5 over a byte tokenizer: a CPU test model) and
``flux_dev`` (``black-forest-labs/FLUX.1-dev``'s published transformer and VAE configs; build it on the
``meta`` device for unit spaces and MACs, or point ``pretrained`` at the real pipeline: a local folder
or a hub id, as ``FluxPipeline.from_pretrained`` takes it)::

    <dir>/transformer/   (or <dir>/config.json: a bare transformer)
    <dir>/scheduler/     <dir>/vae/
    <dir>/text_encoder/ + tokenizer/ (CLIP-L), <dir>/text_encoder_2/ + tokenizer_2/ (T5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from aptp.backbones import flow
from aptp.core.errors import ConfigError
from aptp.core.interfaces import BackboneModules, Conditioning
from aptp.backbones.presets import check_common_fields

TEXT_ENCODERS = ("auto", "pretrained", "random", "none")

#: ``black-forest-labs/FLUX.1-dev`` transformer/config.json (11.9 B parameters).
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

#: A CPU test model: FLUX's layout at width 64 (4 heads of 16), 3 double + 4 single blocks, with the
#: guidance embedding of FLUX.1-dev, on an 8x8x4 latent (16 px images through the tiny VAE).
TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels x 2x2 packing
    "num_layers": 3,
    "num_single_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # the tiny T5's width
    "pooled_projection_dim": 32,  # the tiny CLIP's width
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],  # sums to the head width
}

#: ``FLUX.1-dev`` scheduler/scheduler_config.json: shift grows with the image's token count.
FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_VAE: dict[str, Any] = {**flow.FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
TINY_FLUX_VAE: dict[str, Any] = {**flow.TINY_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

#: tiny random text encoders: CLIP-L (pooled output = its width) and a T5 encoder
TINY_FLUX_TEXT: dict[str, dict[str, Any]] = {
    "clip_l": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "projection_dim": 32, "hidden_act": "gelu", "max_position_embeddings": 77},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2},
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"transformer": TINY_FLUX, "vae": TINY_FLUX_VAE, "text": "random", "clip_len": 16, "t5_len": 16,
             "sample_size": 8},
    "flux_dev": {"transformer": FLUX_DEV, "vae": FLUX_VAE, "text": "none", "clip_len": 77, "t5_len": 512,
                 "sample_size": 128},
}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 W/2, 4 C): 2x2 patches as tokens, ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 W/2, 4 C) -> (B, C, H, W), the inverse of :func:`pack_latents`."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Rotary position ids of the packed tokens, (H/2 W/2, 3): (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def flux_forward(denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 guidance: float = 3.5) -> torch.Tensor:
    """One ``FluxTransformer2DModel`` call in image layout: sample (B, C, H, W), timestep (B,) in
    [0, 1000], packed text (B, 1 + L, D) -> velocity (B, C, H, W). ``guidance`` feeds the guidance
    embedding of guidance-distilled models (ignored by the others)."""
    b, _, h, w = sample.shape
    pooled, sequence = flow.unpack_text(text, int(denoiser.config.pooled_projection_dim))  # (B, P), (B, L, D)
    t = torch.as_tensor(timestep, device=sample.device)
    t = (t.expand(b) if t.dim() == 0 else t).to(sample.dtype) / 1000  # (B,) sigma, as FluxPipeline passes it
    g = torch.full((b,), float(guidance), device=sample.device, dtype=sample.dtype) \
        if denoiser.config.guidance_embeds else None
    out = denoiser(hidden_states=pack_latents(sample), encoder_hidden_states=sequence, pooled_projections=pooled,
                   timestep=t, img_ids=image_ids(h, w, sample.device, sample.dtype),
                   txt_ids=sequence.new_zeros(sequence.shape[1], 3), guidance=g, return_dict=False)[0]
    return unpack_latents(out, h, w)  # (B, C, H, W)



@dataclass
class FluxBackboneConfig:
    """preset: 'tiny' | 'flux_dev' (configs for random builds); pretrained: a diffusers FLUX pipeline folder
    or hub id (or a bare transformer folder) whose parts replace the preset's; resolution: image side in
    pixels (None = 1024 for flux_dev, 16 for tiny); guidance: the guidance embedding's value (FLUX.1-dev;
    FluxPipeline's guidance_scale, 3.5); text_encoder: 'auto' | 'pretrained' | 'random' (the tiny
    encoders) | 'none'; vae: 'auto' or None; text_len: T5 tokens (None = the preset's: 512 as FluxPipeline);
    seed: seed of random builds."""

    preset: str = "tiny"
    pretrained: Optional[str] = None
    resolution: Optional[int] = None
    guidance: float = 3.5
    text_encoder: str = "auto"
    vae: Optional[str] = "auto"
    text_len: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_common_fields(self, PRESETS, TEXT_ENCODERS, text_len_example="FLUX.1-dev uses 512 T5 tokens",
                            side_example=1024, no_vae="no VAE")
        if not self.guidance >= 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0 (FLUX.1-dev's default is 3.5).")


class FluxBackbone(flow.FlowBackbone):
    """FLUX.1: ``FluxTransformer2DModel`` + flow matching + CLIP-L and T5 + 16-channel VAE, packed latents."""

    config_class = FluxBackboneConfig
    presets = PRESETS
    denoiser_class = "FluxTransformer2DModel"
    scheduler_config = FLUX_SCHEDULER

    # --- Backbone API ---------------------------------------------------------------------------
    def conditioning(self) -> Conditioning:
        cfg = self.transformer_config()
        if int(cfg["in_channels"]) % 4:
            raise ConfigError(f"FLUX transformers take 2x2-packed latents, so in_channels must be a multiple of 4 "
                              f"(got {cfg['in_channels']}).")
        default = 128 if self.pretrained is not None else self.preset["sample_size"]  # FluxPipeline: 1024 px
        side = flow.latent_side(self.config.resolution, default, self.vae_scale_factor(), 2)
        return Conditioning((int(cfg["in_channels"]) // 4, side, side), 1 + self._t5_len(),
                            int(cfg["joint_attention_dim"]), call=self.trace_call)

    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        return flux_forward(denoiser, sample, timestep, text_states, self.config.guidance)

    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        """``FluxPipeline.encode_prompt`` packed: (B, 1 + L_t5, D)."""
        if modules.text_encoder is None:
            raise ConfigError("this FLUX backbone was loaded without text encoders (text_encoder='none', or a random "
                              "flux_dev build); set text_encoder: random (tiny) or pretrained with a pipeline folder.")
        pipe = self._text_pipeline(modules)
        device = next(modules.text_encoder.parameters()).device
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt=flow.prompts_list(prompts), prompt_2=None, device=device,
                                                   max_sequence_length=self._t5_len())
        return flow.pack_text(pooled, embeds)  # (B, 1 + L, D)

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Block distillation features: the text-stream output of every double and single block (a block
        returns ``(text, image)`` and aptp records the first; the text tokens attend to the image in
        every block) and the image stream's final ``norm_out``."""
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks, denoiser.norm_out]

    @torch.no_grad()
    def generate(self, modules: BackboneModules, prompts: Sequence[str], *, denoiser: nn.Module | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] sampled by a stock ``FluxPipeline`` around ``denoiser``. The guidance
        embedding gets ``config.guidance``; ``guidance_scale > 1`` adds true classifier-free guidance
        against the empty prompt (``FluxPipeline``'s ``true_cfg_scale``)."""
        from diffusers import FluxPipeline

        denoiser = denoiser if denoiser is not None else modules.denoiser
        param = next(denoiser.parameters())
        prompts = flow.prompts_list(prompts)
        p = int(denoiser.config.pooled_projection_dim)
        pooled, embeds = flow.unpack_text(self.encode_prompts(modules, prompts).to(param.device, param.dtype), p)
        neg = {}
        if guidance_scale > 1.0:
            n_pooled, n_embeds = flow.unpack_text(
                self.encode_prompts(modules, [""] * len(prompts)).to(param.device, param.dtype), p)
            neg = {"negative_prompt_embeds": n_embeds, "negative_pooled_prompt_embeds": n_pooled,
                   "true_cfg_scale": guidance_scale}
        x = self.initial_latents(len(prompts), latents, generator).to(param.device, param.dtype)  # (B, C, H, W)
        h, w = x.shape[-2:]
        pipe = FluxPipeline(transformer=denoiser, scheduler=flow.stock_scheduler(modules.scheduler), vae=modules.vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        f = self.vae_scale_factor()
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **neg, latents=pack_latents(x), height=h * f,
                   width=w * f, num_inference_steps=num_inference_steps, guidance_scale=self.config.guidance,
                   output_type="latent", return_dict=False)[0]  # (B, H/2 W/2, 4 C)
        return self.decode(modules, unpack_latents(out, h, w)).float()

    # --- parts ------------------------------------------------------------------------------------
    def _text_pipeline(self, modules: BackboneModules) -> Any:
        """A text-only ``FluxPipeline`` over the loaded encoders (for its ``encode_prompt``)."""
        pipe = modules.extra.get("_text_pipeline")
        if pipe is None:
            from diffusers import FluxPipeline

            pipe = FluxPipeline(transformer=None, scheduler=flow.stock_scheduler(modules.scheduler), vae=None,
                                text_encoder=modules.text_encoder, tokenizer=modules.tokenizer,
                                text_encoder_2=modules.extra.get("text_encoder_2"),
                                tokenizer_2=modules.extra.get("tokenizer_2"))
            pipe.set_progress_bar_config(disable=True)
            modules.extra["_text_pipeline"] = pipe
        return pipe

    def _text(self, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
        kind = self._text_kind()
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        if kind == "none":
            return dict.fromkeys(names)
        if kind == "random":
            if self.config.preset != "tiny":
                raise ConfigError("text_encoder: random builds the tiny test encoders; use it with preset: tiny, or "
                                  "pretrained with a pipeline folder.")
            c_enc, c_tok = flow.tiny_clip(TINY_FLUX_TEXT["clip_l"], self.config.seed + 1, False,
                                          int(self.preset["clip_len"]))
            t_enc, t_tok = flow.tiny_t5(TINY_FLUX_TEXT["t5"], self.config.seed + 4, self._t5_len())
            return dict(zip(names, (c_enc, c_tok, t_enc, t_tok)))
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        where = [self._location(p) for p in ("text_encoder", "text_encoder_2")]
        if any(w is None for w in where):
            raise ConfigError(f"text_encoder: pretrained needs pretrained=<FLUX pipeline folder> with text_encoder/ and "
                              f"text_encoder_2/ (got {self.config.pretrained!r}); use none otherwise.")
        root = where[0][0]
        return {"text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
                "text_encoder_2": T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype),
                "tokenizer_2": AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2")}
