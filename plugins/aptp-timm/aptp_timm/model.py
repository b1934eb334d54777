"""A DiT-style text-to-image denoiser made of timm's Vision Transformer blocks.

The image is cut into patches (as in DiT / ViT); the prompt's token states and the timestep join
the patch tokens *in context* (DiT's "in-context conditioning": extra tokens in the sequence, no
custom block), so the body is a plain stack of unmodified ``timm.models.vision_transformer.Block``::

    sample (B, C, H, W) --patch_embed--> x (B, P, D)          P = (H / p) * (W / p) patches
    text   (B, L, D_text) --text_proj--> c (B, L, D)
    t      (B,)            --time_embed--> e (B, 1, D)
    tokens = [c, e, x + pos]                      (B, L + 1 + P, D)
    tokens = blocks(tokens)                       depth x timm Block (Attention + Mlp, pre-norm)
    out    = unpatchify(proj_out(norm_out(tokens[:, -P:])))    (B, C, H, W)

The call convention is diffusers' (``model(sample, timestep, encoder_hidden_states=text,
return_dict=False)[0]``), which is how aptp's granularities trace a denoiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from aptp_timm.macs import attention_macs  # noqa: F401  (registers timm Attention's MACs formula)


@dataclass
class TimmDiTOutput:
    """What ``TimmDiT(..., return_dict=True)`` returns (diffusers' ``.sample`` convention)."""

    sample: torch.Tensor


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), as in DiT / diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimmDiT(nn.Module):
    """DiT-style denoiser: patch tokens + in-context prompt tokens through timm ViT ``Block`` s."""

    def __init__(self, sample_size: int = 16, in_channels: int = 3, patch_size: int = 4, dim: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 text_dim: int = 384, freq_dim: int = 256) -> None:
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} is not a multiple of patch_size={patch_size}; "
                             "choose a patch size that divides the sample side.")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        self.sample_size, self.in_channels, self.patch_size = sample_size, in_channels, patch_size
        self.freq_dim = freq_dim
        self.grid = sample_size // patch_size
        num_patches = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))  # (1, P, D)
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth)]
        )
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True):
        """sample (B, C, H, W), timestep (B,) or scalar, encoder_hidden_states (B, L, D_text) -> (B, C, H, W)."""
        b, c, h, w = sample.shape
        if (c, h, w) != (self.in_channels, self.sample_size, self.sample_size):
            raise ValueError(f"TimmDiT takes samples of shape (B, {self.in_channels}, {self.sample_size}, "
                             f"{self.sample_size}), got {tuple(sample.shape)}; build it for that resolution.")
        if encoder_hidden_states is None:
            raise ValueError("TimmDiT is text-conditioned: pass encoder_hidden_states (B, L, D_text).")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.dim() == 0 else t  # (B,)
        x = self.patch_embed(sample).flatten(2).transpose(1, 2) + self.pos_embed  # (B, P, D)
        e = self.time_embed(timestep_embedding(t, self.freq_dim).to(x.dtype)).unsqueeze(1)  # (B, 1, D)
        txt = self.text_proj(encoder_hidden_states.to(x.dtype))  # (B, L, D)
        tokens = torch.cat([txt, e, x], dim=1)  # (B, L + 1 + P, D)
        for block in self.blocks:
            tokens = block(tokens)
        x = self.proj_out(self.norm_out(tokens[:, -x.shape[1]:]))  # (B, P, p * p * C)
        p, g = self.patch_size, self.grid
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, C, H, W)
        return TimmDiTOutput(sample=x) if return_dict else (x,)
