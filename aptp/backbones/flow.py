"""What the rectified-flow backbones (``sd3``, ``flux``) share: training in rectified-flow terms
(noising, velocity target, Min-SNR weights), the packing of pooled + sequence text states into one
tensor, VAE latents with a shift, tiny text encoders for tests, and sampling through the model's
stock diffusers pipeline.

Rectified flow (Esser et al. 2024, arXiv 2403.03206): ``x_t = (1 - sigma) x0 + sigma eps`` with
``sigma = t / 1000``; the denoiser predicts the velocity ``v = eps - x0``. aptp's timestep convention
for these backbones is ``t`` in ``[0, 1000]`` (``sigma * 1000``, what ``StableDiffusion3Pipeline``
passes to its transformer; ``FluxPipeline`` passes ``t / 1000`` and the FLUX backbone divides).

Text conditioning of both models is a *pooled* vector (B, P) and a *sequence* (B, L, D). The
Backbone contract carries one text tensor (B, L', D), so the backbones pack them::

    text = pack_text(pooled, sequence)   # (B, 1 + L, D): row 0 = pooled, zero-padded to D (P <= D)
    pooled, sequence = unpack_text(text, P)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from aptp.backbones.unet import expand_pretrained, local_pretrained
from aptp.backbones.diffusers_base import DiffusersBackbone
from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import BackboneModules

# ------------------------------------------------------------------------------------- text packing


def pack_text(pooled: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """pooled (B, P) + sequence (B, L, D) -> text (B, 1 + L, D): row 0 holds ``pooled`` zero-padded to D."""
    b, p = pooled.shape
    d = sequence.shape[-1]
    if p > d:
        raise ShapeError(f"a pooled text vector of width {p} does not fit the {d}-wide text states; "
                         "use a text encoder whose pooled width is at most the sequence width.")
    row = sequence.new_zeros(b, 1, d)
    row[:, 0, :p] = pooled.to(sequence)
    return torch.cat([row, sequence], dim=1)


def unpack_text(text: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """text (B, 1 + L, D) -> (pooled (B, P), sequence (B, L, D)); the inverse of :func:`pack_text`."""
    if text.dim() != 3 or text.shape[1] < 2 or text.shape[-1] < pooled_dim:
        raise ShapeError(f"text states must be (B, 1 + L, D >= {pooled_dim}) with the pooled vector in row 0 "
                         f"(aptp.backbones.flow.pack_text), got {tuple(text.shape)}.")
    return text[:, 0, :pooled_dim], text[:, 1:]


# ------------------------------------------------------------------------------------- scheduler
def flow_scheduler(config: dict[str, Any]) -> Any:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` from its config (the noising, target and loss
    weights of training come from :class:`FlowBackbone`, not from the scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def stock_scheduler(scheduler: Any) -> Any:
    """A plain ``FlowMatchEulerDiscreteScheduler`` with ``scheduler``'s config (fresh state), for pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler._internal_dict))


def _sigma(scheduler: Any, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma = t / T broadcast to ``like`` (B, 1, ..., 1), T = ``num_train_timesteps``."""
    s = t.to(device=like.device, dtype=torch.float32) / scheduler.config.num_train_timesteps
    return s.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


# ------------------------------------------------------------------------------------------ VAE

#: The 16-channel VAE layout of SD3 and FLUX (``AutoencoderKL`` without quant convs); each model has its
#: own scaling_factor / shift_factor.
FLOW_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

#: A CPU test VAE with the same conventions: factor 2, 4 latent channels, scaling + shift.
TINY_FLOW_VAE: dict[str, Any] = {
    **FLOW_VAE,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def to_latents(vae: nn.Module, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> ``(z - shift_factor) * scaling_factor`` (B, C, h, w), as the
    SD3 / FLUX pipelines expect (``eps`` samples the posterior; None takes its mean)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.mean if eps is None else posterior.mean + posterior.std * eps.to(posterior.mean)
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode(vae: nn.Module | None, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> images (B, 3, H, W) in [0, 1] (the inverse scaling and shift, then the VAE)."""
    x = latents
    if vae is not None:
        x = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return (x / 2 + 0.5).clamp(0, 1)


# -------------------------------------------------------------------------------- tiny text encoders
def tiny_clip(config: dict[str, Any], seed: int, with_projection: bool, max_length: int) -> tuple[nn.Module, Any]:
    """A random ``CLIPTextModel[WithProjection]`` over the byte-level CLIP tokenizer (no hub)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from aptp.backbones.tokenizer import BYTE_CLIP_BOS, BYTE_CLIP_EOS, BYTE_CLIP_VOCAB, byte_clip_tokenizer

    cfg = CLIPTextConfig(**{"vocab_size": BYTE_CLIP_VOCAB, **config}, bos_token_id=BYTE_CLIP_BOS,
                         eos_token_id=BYTE_CLIP_EOS, pad_token_id=BYTE_CLIP_EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    return model.eval(), byte_clip_tokenizer(max_length)


def tiny_t5(config: dict[str, Any], seed: int, max_length: int) -> tuple[nn.Module, Any]:
    """A random ``T5EncoderModel`` over the byte-level tokenizer (ids only matter to random weights)."""
    from transformers import T5Config, T5EncoderModel

    from aptp.backbones.tokenizer import BYTE_CLIP_EOS, BYTE_CLIP_VOCAB, byte_clip_tokenizer

    cfg = T5Config(**{"vocab_size": BYTE_CLIP_VOCAB, **config}, pad_token_id=BYTE_CLIP_EOS,
                   eos_token_id=BYTE_CLIP_EOS, decoder_start_token_id=BYTE_CLIP_EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    return model.eval(), byte_clip_tokenizer(max_length)


def latent_side(resolution: int | None, sample_size: int, vae_factor: int, multiple: int) -> int:
    """The latent side for an image side ``resolution`` (None: ``sample_size``), checked to divide
    into the model's patches (``multiple``)."""
    if resolution is not None and resolution % vae_factor:
        raise ConfigError(f"resolution={resolution} is not a multiple of the VAE factor {vae_factor}.")
    side = resolution // vae_factor if resolution is not None else int(sample_size)
    if side % multiple:
        raise ConfigError(f"a {side}x{side} latent does not divide into {multiple}x{multiple} patches; choose a "
                          f"resolution that is a multiple of {vae_factor * multiple}.")
    return side


def prompts_list(prompts: Sequence[str]) -> list[str]:
    out = list(prompts)
    if not out:
        raise ValueError("no prompt given; pass at least one prompt.")
    return out


# -------------------------------------------------------------------------------- shared backbone
class FlowBackbone(DiffusersBackbone):
    """What the SD3 and FLUX backbones share: where a pipeline's parts are (a local folder or a hub id,
    as diffusers' ``from_pretrained`` takes them), the transformer built from the preset or loaded,
    the VAE with its shift, the flow-matching scheduler and the initial noise.

    A subclass sets ``presets`` (name -> {'transformer', 'vae', 'text', 't5_len', ...}),
    ``denoiser_class`` (the diffusers class name) and ``scheduler_config``, and loads its text encoders
    in ``_text`` (a dict of the pipeline's text slots: text_encoder, tokenizer, text_encoder_2, ...).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    denoiser_class: ClassVar[str] = ""
    scheduler_config: ClassVar[dict[str, Any]] = {}

    # --- where things are ---------------------------------------------------------------------
    @property
    def preset(self) -> dict[str, Any]:
        return self.presets[self.config.preset]

    @property
    def pretrained(self) -> str | None:
        """``config.pretrained`` with ``~`` expanded."""
        return expand_pretrained(self.config.pretrained)

    def _local(self) -> Path | None:
        return local_pretrained(self.pretrained, self.config.pretrained, hub=True)

    def _location(self, part: str) -> tuple[str, str | None] | None:
        """(path or hub id, subfolder) of a pipeline part; None without ``pretrained`` or when a local
        folder lacks the part. A bare transformer folder (``config.json``) is its own transformer."""
        if self.pretrained is None:
            return None
        local = self._local()
        if local is None:  # a hub id: diffusers resolves the subfolder
            return self.pretrained, part
        if (local / part).is_dir():
            return str(local), part
        if part == "transformer" and (local / "config.json").is_file():
            return str(local), None
        if part == "transformer":
            raise ConfigError(f"pretrained={self.config.pretrained!r} holds neither transformer/config.json nor "
                              "config.json; point it at a diffusers pipeline folder or a saved transformer.")
        return None

    def transformer_config(self) -> dict[str, Any]:
        """The transformer's diffusers config (pretrained, else the preset)."""
        where = self._location("transformer")
        if where is None:
            return dict(self.preset["transformer"])
        import diffusers

        return dict(getattr(diffusers, self.denoiser_class).load_config(where[0], subfolder=where[1]))

    def vae_config(self) -> dict[str, Any] | None:
        if self.config.vae is None:
            return None
        if self.pretrained is None:
            return dict(self.preset["vae"])
        where = self._location("vae")
        if where is None:
            return None
        from diffusers import AutoencoderKL

        return dict(AutoencoderKL.load_config(where[0], subfolder=where[1]))

    def vae_scale_factor(self) -> int:
        cfg = self.vae_config()
        return 2 ** (len(cfg["block_out_channels"]) - 1) if cfg else 8

    def _text_kind(self) -> str:
        kind = self.config.text_encoder
        if kind != "auto":
            return kind
        if self.pretrained is not None:
            return "pretrained" if self._location("text_encoder") is not None else "none"
        return self.preset["text"]

    def _t5_len(self) -> int:
        """T5 tokens per prompt (``max_sequence_length`` of the diffusers pipeline)."""
        return self.config.text_len if self.config.text_len is not None else int(self.preset["t5_len"])

    # --- Backbone API ---------------------------------------------------------------------------
    def build_denoiser(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        where = self._location("transformer")
        if where is not None and str(device) != "meta":
            return cls.from_pretrained(where[0], subfolder=where[1], torch_dtype=dtype).to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed)
            model = cls.from_config(self.transformer_config())
        return (model if dtype == torch.float32 else model.to(dtype=dtype)).eval()

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BackboneModules:
        """Every part; the text slots beyond the first (``text_encoder_2``, ``tokenizer_2``, ...) in ``extra``."""
        encoders = self._text(device, dtype)
        for k, enc in encoders.items():
            if k.startswith("text_encoder") and enc is not None:
                encoders[k] = enc.to(device=device, dtype=dtype).eval()
        return BackboneModules(self.build_denoiser(device, dtype), self._scheduler(), encoders.pop("text_encoder"),
                               encoders.pop("tokenizer"), self._vae(device, dtype),
                               extra={**encoders, "text_encoder_kind": self._text_kind(),
                                      "vae_scale_factor": self.vae_scale_factor()})

    def to_latents(self, modules: BackboneModules, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return images if modules.vae is None else to_latents(modules.vae, images, eps)

    def decode(self, modules: BackboneModules, sample: torch.Tensor) -> torch.Tensor:
        return decode(modules.vae, sample)

    # --- training in rectified-flow terms (sigma = t / T, integer t drawn uniformly) ------------
    def add_noise(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma) x0 + sigma eps`` (B, C, H, W), sigma = t / T."""
        s = _sigma(scheduler, timesteps, x0)  # (B, 1, 1, 1)
        return (1 - s) * x0 + s * noise

    def training_target(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """The rectified-flow velocity ``v = eps - x0`` (B, C, H, W): d x_t / d sigma of
        ``x_t = (1 - sigma) x0 + sigma eps``, what the transformer predicts."""
        return noise - x0

    def prediction_type(self, scheduler: Any) -> str:
        """``v_prediction`` for Min-SNR weighting: the flow-matching target is a velocity."""
        return "v_prediction"

    def snr(self, scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ((1 - sigma) / sigma)^2, (B,) float32, through the variance-preserving noise
        level with the same ratio, ``a = (1 - s)^2 / ((1 - s)^2 + s^2)`` (T,), SNR = a / (1 - a)."""
        n = scheduler.config.num_train_timesteps
        s = torch.arange(n, dtype=torch.float64) / n  # (T,)
        a = ((1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)).float()  # (T,)
        a = a.to(timesteps.device)[timesteps].float()  # (B,)
        return a / (1 - a)

    # --- parts ------------------------------------------------------------------------------------
    def _text(self, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError

    def _vae(self, device: str | torch.device, dtype: torch.dtype) -> nn.Module | None:
        cfg = self.vae_config()
        if cfg is None:
            return None
        from diffusers import AutoencoderKL

        if self.pretrained is not None:
            where = self._location("vae")
            return AutoencoderKL.from_pretrained(where[0], subfolder=where[1], torch_dtype=dtype).to(device).eval()
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(self.config.seed + 2)
            vae = AutoencoderKL.from_config(cfg)
        return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()

    def _scheduler(self) -> Any:
        where = self._location("scheduler")
        if where is not None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            return flow_scheduler(dict(FlowMatchEulerDiscreteScheduler.load_config(where[0], subfolder=where[1])))
        return flow_scheduler(self.scheduler_config)
