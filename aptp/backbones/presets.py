"""Model configs of the built-in presets (random-weight builds need no hub access).

* ``sd21`` -- Stable Diffusion 2.1 (768-v): UNet, VAE, OpenCLIP-H text encoder and DDIM scheduler
  configs as published with ``stabilityai/stable-diffusion-2-1``.
* ``small`` -- SD2.1's layout (and VAE) at 0.4 x its width (145 M parameters, head width 64) for CPU
  latency benchmarks: at 128 px (16x16 latent, 4.3 GMACs) attention matmuls are 3 % of its MACs,
  like SD2.1 at the paper's 256 px (5 %); at 256 px 11 %.
* ``tiny`` -- a CPU test model with SD2.1's *layout* (4 stages, 2 ResNets per stage, linear
  projections, GEGLU FFNs, v-prediction) and a similar cost mix at its resolution: attention only at
  the two middle resolutions (16x16 and 8x8 of a 32x32 latent) so that attention matmuls are 11 % of
  its MACs (SD2.1 at 64x64: 16 %, at 96x96: 29 %) instead of the ~64 % of CPU time a tiny
  UNet with full-resolution attention spends there. Its first and last stages are attention-free
  (SD2.1 has attention-free *last* down / first up stages), so both kinds of stages are exercised.
"""

from __future__ import annotations

from typing import Any

SD21_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' legacy name: the NUMBER of heads
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

SD21_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD21_TEXT: dict[str, Any] = {  # OpenCLIP ViT-H/14 text tower as CLIPTextModel (penultimate layer kept)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}

SD21_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

SMALL_UNET: dict[str, Any] = {  # SD2.1's layout at 0.4 x width, head width 64 as SD2.1: 145 M parameters
    **SD21_UNET,
    "attention_head_dim": [2, 4, 8, 8],
    "block_out_channels": [128, 256, 512, 512],
    "sample_size": 32,
}

SMALL_TEXT: dict[str, Any] = {**SD21_TEXT, "intermediate_size": 1024, "num_hidden_layers": 2, "vocab_size": 1000}

TINY_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [2, 4, 4, 4],  # heads; head width 16 where attention runs
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

TINY_VAE: dict[str, Any] = {  # scale factor 2: a 64 px image <-> a 32x32x4 latent
    "act_fn": "silu",
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "vocab_size": 1000,
}

TINY_SCHEDULER: dict[str, Any] = {**SD21_SCHEDULER}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd21": {"unet": SD21_UNET, "vae": SD21_VAE, "text": SD21_TEXT, "scheduler": SD21_SCHEDULER},
    "small": {"unet": SMALL_UNET, "vae": SD21_VAE, "text": SMALL_TEXT, "scheduler": SD21_SCHEDULER},
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "scheduler": TINY_SCHEDULER},
}


def check_common_fields(config: Any, presets: Any, text_encoders: Any, *, text_len_example: str,
                        side_example: int, no_vae: str = "pixel space") -> None:
    """The checks every built-in backbone config shares (``preset``, ``text_encoder``, ``vae``,
    ``text_len``, ``resolution``), as one-line ValueErrors naming the field and what to use."""
    if config.preset not in presets:
        raise ValueError(f"preset={config.preset!r} is unknown; use one of {sorted(presets)}.")
    if config.text_encoder not in text_encoders:
        raise ValueError(f"text_encoder={config.text_encoder!r} is unknown; use one of {list(text_encoders)}.")
    if config.vae not in (None, "auto"):
        raise ValueError(f"vae={config.vae!r} must be 'auto' or null ({no_vae}).")
    if config.text_len is not None and config.text_len < 1:
        raise ValueError(f"text_len={config.text_len} must be >= 1 ({text_len_example}).")
    if config.resolution is not None and config.resolution < 8:
        raise ValueError(f"resolution={config.resolution} is too small; give the image side in pixels "
                         f"(e.g. {side_example}) or null.")
