"""Backbone over Stable Diffusion 3 (diffusers ``SD3Transformer2DModel``, an MMDiT: joint attention
over an image and a text stream), with ``StableDiffusion3Pipeline``'s conventions: rectified flow
(``FlowMatchEulerDiscreteScheduler``, velocity prediction, ``t = sigma * 1000``), text from CLIP-L +
CLIP-G (pooled (B, 2048) and penultimate states, zero-padded to 4096) and T5-XXL (B, 256, 4096), a
16-channel VAE with a shift.

The transformer's blocks are diffusers ``JointTransformerBlock`` s, so aptp's generic granularities
prune it: ``attention_heads`` (joint attention: each head's rows of ``to_q/k/v`` and
``add_q/k/v_proj``, its columns of ``to_out[0]`` and ``to_add_out``: both streams lose the same heads),
``ffn`` (``ff`` and ``ff_context``) and ``depth`` (whole blocks, middle-out, the first and last kept).

Text goes through the Backbone contract as one tensor: ``(B, 1 + L_clip + L_t5, 4096)`` whose row 0
is the pooled vector (:func:`aptp.backbones.flow.pack_text`).

Presets (``configs/backbone/sd3.yaml``): ``tiny`` (4 blocks of width 64 on a 4-channel latent through
a tiny VAE, tiny random CLIP / T5 encoders over a byte tokenizer: a CPU test model) and
``sd3_medium`` (``stabilityai/stable-diffusion-3-medium-diffusers``' published transformer and VAE
configs: 24 blocks, 24 heads of 64; build it on the ``meta`` device for unit spaces and MACs, or point
``pretrained`` at the real pipeline). With ``pretrained`` set -- a local folder or a hub id, as
``StableDiffusion3Pipeline.from_pretrained`` takes it (:func:`aptp.backbones.unet.local_pretrained`) --
the parts load from::

    <dir>/transformer/           (or <dir>/config.json: a bare transformer)
    <dir>/scheduler/             (FlowMatchEulerDiscreteScheduler)
    <dir>/text_encoder/, text_encoder_2/, text_encoder_3/ (optional, as in diffusers) + tokenizer*/
    <dir>/vae/
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from aptp.backbones import flow
from aptp.core.errors import ConfigError
from aptp.core.interfaces import BackboneModules, Conditioning
from aptp.backbones.presets import check_common_fields

TEXT_ENCODERS = ("auto", "pretrained", "random", "none")

#: ``stabilityai/stable-diffusion-3-medium-diffusers`` transformer/config.json (2.0 B parameters).
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

#: A CPU test model: SD3's layout at width 64 (4 heads of 16) on an 8x8x4 latent (16 px images).
TINY_SD3: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # the tiny T5's width (CLIP-L + CLIP-G states: 32 + 32)
    "caption_projection_dim": 64,
    "pooled_projection_dim": 64,  # CLIP-L + CLIP-G projections: 32 + 32
    "out_channels": 4,
    "pos_embed_max_size": 16,
}

SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
SD3_VAE: dict[str, Any] = {**flow.FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
TINY_SD3_VAE: dict[str, Any] = {**flow.TINY_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}

#: tiny random text encoders: CLIP-L and CLIP-G (with projection) and a T5 encoder
TINY_SD3_TEXT: dict[str, dict[str, Any]] = {
    "clip_l": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "projection_dim": 32, "hidden_act": "gelu", "max_position_embeddings": 77},
    "clip_g": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "projection_dim": 32, "hidden_act": "gelu", "max_position_embeddings": 77},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2},
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"transformer": TINY_SD3, "vae": TINY_SD3_VAE, "text": "random", "clip_len": 16, "t5_len": 16},
    "sd3_medium": {"transformer": SD3_MEDIUM, "vae": SD3_VAE, "text": "none", "clip_len": 77, "t5_len": 256},
}


def sd3_forward(denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One ``SD3Transformer2DModel`` call: sample (B, C, H, W), timestep (B,) in [0, 1000], packed text
    (B, 1 + L, D) -> velocity (B, C, H, W)."""
    pooled, sequence = flow.unpack_text(text, int(denoiser.config.pooled_projection_dim))  # (B, P), (B, L, D)
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.expand(sample.shape[0]) if t.dim() == 0 else t  # (B,)
    return denoiser(hidden_states=sample, encoder_hidden_states=sequence, pooled_projections=pooled, timestep=t,
                    return_dict=False)[0]



@dataclass
class SD3BackboneConfig:
    """preset: 'tiny' | 'sd3_medium' (configs for random builds); pretrained: a diffusers SD3 pipeline
    folder or hub id (or a bare transformer folder) whose parts replace the preset's; resolution: image
    side in pixels (None = sample_size x the VAE factor); text_encoder: 'auto' (the pretrained encoders,
    else the preset's) | 'pretrained' | 'random' (the tiny encoders) | 'none'; vae: 'auto' or None (latent
    space only); text_len: T5 tokens (None = the preset's: 256 as StableDiffusion3Pipeline); seed: seed
    of random builds."""

    preset: str = "tiny"
    pretrained: Optional[str] = None
    resolution: Optional[int] = None
    text_encoder: str = "auto"
    vae: Optional[str] = "auto"
    text_len: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_common_fields(self, PRESETS, TEXT_ENCODERS, text_len_example="SD3 uses 256 T5 tokens",
                            side_example=1024, no_vae="no VAE")


class SD3Backbone(flow.FlowBackbone):
    """Stable Diffusion 3: ``SD3Transformer2DModel`` + flow matching + CLIP-L/G and T5 + 16-channel VAE."""

    config_class = SD3BackboneConfig
    presets = PRESETS
    denoiser_class = "SD3Transformer2DModel"
    scheduler_config = SD3_SCHEDULER

    def _clip_len(self) -> int:
        """CLIP tokens per prompt: the pretrained tokenizer's ``model_max_length`` (77 for SD3's CLIPs and
        for hub ids), else the preset's (tiny: 16)."""
        if self.pretrained is None:
            return int(self.preset["clip_len"])
        where = self._location("tokenizer")
        path = None if where is None or self._local() is None else Path(where[0]) / "tokenizer" / "tokenizer_config.json"
        if path is not None and path.is_file():
            n = json.loads(path.read_text()).get("model_max_length")
            if isinstance(n, int) and 0 < n < 100_000:
                return n
        return 77

    def _patch(self) -> int:
        return int(self.transformer_config().get("patch_size", 2))

    # --- Backbone API ---------------------------------------------------------------------------
    def conditioning(self) -> Conditioning:
        cfg = self.transformer_config()
        side = flow.latent_side(self.config.resolution, cfg["sample_size"], self.vae_scale_factor(), self._patch())
        return Conditioning((int(cfg["in_channels"]), side, side), 1 + self._clip_len() + self._t5_len(),
                            int(cfg["joint_attention_dim"]), call=self.trace_call)

    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        return sd3_forward(denoiser, sample, timestep, text_states)

    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        """``StableDiffusion3Pipeline.encode_prompt`` packed: (B, 1 + L_clip + L_t5, D)."""
        if modules.text_encoder is None:
            raise ConfigError("this SD3 backbone was loaded without text encoders (text_encoder='none', or a random "
                              "sd3_medium build); set text_encoder: random (tiny) or pretrained with a pipeline folder.")
        pipe = self._text_pipeline(modules)
        device = next(modules.text_encoder.parameters()).device
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=flow.prompts_list(prompts), prompt_2=None, prompt_3=None,
                                                      device=device, do_classifier_free_guidance=False,
                                                      max_sequence_length=self._t5_len())
        return flow.pack_text(pooled, embeds)  # (B, 1 + L, D)

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Block distillation features: the text-stream output of every block but the last (whose text
        output SD3 drops) -- a block returns ``(text, image)`` and aptp records the first -- and the
        image stream's final ``norm_out``."""
        return [*list(denoiser.transformer_blocks)[:-1], denoiser.norm_out]

    @torch.no_grad()
    def generate(self, modules: BackboneModules, prompts: Sequence[str], *, denoiser: nn.Module | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] sampled by a stock ``StableDiffusion3Pipeline`` around ``denoiser``
        (classifier-free guidance against the empty prompt when ``guidance_scale > 1``)."""
        from diffusers import StableDiffusion3Pipeline

        denoiser = denoiser if denoiser is not None else modules.denoiser
        param = next(denoiser.parameters())
        prompts = flow.prompts_list(prompts)
        text = self.encode_prompts(modules, prompts).to(param.device, param.dtype)
        pooled, embeds = flow.unpack_text(text, int(denoiser.config.pooled_projection_dim))
        neg = {}
        if guidance_scale > 1.0:
            n_pooled, n_embeds = flow.unpack_text(self.encode_prompts(modules, [""] * len(prompts)).to(text),
                                                  int(denoiser.config.pooled_projection_dim))
            neg = {"negative_prompt_embeds": n_embeds, "negative_pooled_prompt_embeds": n_pooled}
        x = self.initial_latents(len(prompts), latents, generator).to(param.device, param.dtype)  # (B, C, H, W)
        pipe = StableDiffusion3Pipeline(transformer=denoiser, scheduler=flow.stock_scheduler(modules.scheduler),
                                        vae=modules.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        f = self.vae_scale_factor()
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **neg, latents=x, height=x.shape[-2] * f,
                   width=x.shape[-1] * f, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   output_type="latent", return_dict=False)[0]  # (B, C, H, W)
        return self.decode(modules, out).float()

    # --- parts ------------------------------------------------------------------------------------
    def _text_pipeline(self, modules: BackboneModules) -> Any:
        """A text-only ``StableDiffusion3Pipeline`` over the loaded encoders (for its ``encode_prompt``)."""
        pipe = modules.extra.get("_text_pipeline")
        if pipe is None:
            from diffusers import StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline(
                transformer=None, scheduler=flow.stock_scheduler(modules.scheduler), vae=None,
                text_encoder=modules.text_encoder, tokenizer=modules.tokenizer,
                text_encoder_2=modules.extra.get("text_encoder_2"), tokenizer_2=modules.extra.get("tokenizer_2"),
                text_encoder_3=modules.extra.get("text_encoder_3"), tokenizer_3=modules.extra.get("tokenizer_3"))
            pipe.set_progress_bar_config(disable=True)
            modules.extra["_text_pipeline"] = pipe
        return pipe

    def _text(self, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
        kind = self._text_kind()
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
        if kind == "none":
            return dict.fromkeys(names)
        if kind == "random":
            if self.config.preset != "tiny":
                raise ConfigError("text_encoder: random builds the tiny test encoders; use it with preset: tiny, or "
                                  "pretrained with a pipeline folder.")
            clip_len = self._clip_len()
            l_enc, l_tok = flow.tiny_clip(TINY_SD3_TEXT["clip_l"], self.config.seed + 1, True, clip_len)
            g_enc, g_tok = flow.tiny_clip(TINY_SD3_TEXT["clip_g"], self.config.seed + 3, True, clip_len)
            t_enc, t_tok = flow.tiny_t5(TINY_SD3_TEXT["t5"], self.config.seed + 4, self._t5_len())
            parts = (l_enc, l_tok, g_enc, g_tok, t_enc, t_tok)
        else:
            parts = self._pretrained_text(dtype)
        return dict(zip(names, parts))

    def _pretrained_text(self, dtype: torch.dtype) -> tuple[Any, ...]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        where = [self._location(p) for p in ("text_encoder", "text_encoder_2")]
        if any(w is None for w in where):
            raise ConfigError(f"text_encoder: pretrained needs pretrained=<SD3 pipeline folder> with text_encoder/ and "
                              f"text_encoder_2/ (got {self.config.pretrained!r}); use none otherwise.")
        root = where[0][0]
        l_enc = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder", dtype=dtype)
        g_enc = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", dtype=dtype)
        l_tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        g_tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
        t_enc = t_tok = None
        if self._location("text_encoder_3") is not None:  # SD3 runs without T5 too (zeros, as diffusers)
            t_enc = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3", dtype=dtype)
            t_tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_3")
        return l_enc, l_tok, g_enc, g_tok, t_enc, t_tok

