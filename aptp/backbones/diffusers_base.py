"""What every diffusers-based backbone shares: the sampling loop, VAE latents, the training target,
how the MACs tracer calls the denoiser and counts diffusers' attentions, and experts on disk.

:class:`DiffusersBackbone` implements the parts of the :class:`~aptp.core.interfaces.Backbone`
contract that are the same for any model run by a diffusers scheduler; a backbone subclasses it and
adds what is its own (where the parts come from, how the denoiser is called, how prompts are
encoded). ``unet``, ``dit``, ``sd3`` and ``flux`` do, and so can a plugin's backbone whose denoiser is
not a diffusers model (``timm_dit``: plain ``nn.Module`` experts are saved as ``model.safetensors``).

The sampling loop (DDPM-family schedulers, classifier-free guidance against the empty prompt)::

    x = latents * init_noise_sigma                          # (B, C, H, W)
    for t in scheduler.timesteps:
        pred = denoise(cat[x, x] if cfg else x, t, text)    # (2B | B, C, H, W)
        pred = uncond + w * (cond - uncond)                 # cfg
        x = scheduler.step(pred, t, x).prev_sample
    images = decode(x)                                      # (B, 3, H', W') in [0, 1]

MACs: the core's tracer (:mod:`aptp.core.resources`) knows Conv2d and Linear only; the attention
matmuls of diffusers' ``Attention`` (and of the per-model attentions built on
``AttentionModuleMixin``: ``FluxAttention``, ...) run inside ``F.scaled_dot_product_attention``, so
:func:`register_diffusers_macs` teaches it ``Q K^T`` + ``P V`` = ``2 B heads N M d``, with M the key
length (the text length for cross-attention; joint attention, SD3 / FLUX ``add_q_proj``: N = M =
N_image + L_text). :meth:`DiffusersBackbone.trace_call` registers them before the traced call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import Backbone, BackboneModules
from aptp.core.resources import register_macs_formula

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "MODULE_WEIGHTS",
    "DiffusersBackbone",
    "attention_types",
    "diffusers_call",
    "diffusers_model_from_config",
    "load_denoiser_files",
    "min_snr_weights",
    "register_diffusers_macs",
    "save_denoiser_files",
]


# ------------------------------------------------------------------------------------------ Min-SNR
def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) from SNR(t) (B,): epsilon: min(SNR, g) / SNR;
    v-prediction: min(SNR, g) / (SNR + 1); sample: min(SNR, g)."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped


# ------------------------------------------------------------------------------------------ backbone
class DiffusersBackbone(Backbone):
    """A backbone whose model runs under a diffusers scheduler: the shared implementations.

    Subclasses implement ``conditioning``, ``load``, ``build_denoiser``, ``denoise`` and
    ``encode_prompts`` (and override the rest where their model differs: a latent shift, a stock
    pipeline's sampler, flow matching's velocity target)."""

    # --- calling ----------------------------------------------------------------------------------
    def trace_call(self, denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                   text_states: torch.Tensor) -> Any:
        """:meth:`denoise`, after teaching the MACs tracer diffusers' attentions (:func:`register_diffusers_macs`)."""
        register_diffusers_macs()
        return self.denoise(denoiser, sample, timestep, text_states)

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Every down, mid and up block of a UNet (and the ``transformer_blocks`` of a transformer):
        their output widths are never pruned, so teacher and expert features align."""
        mods: list[nn.Module] = []
        for name in ("down_blocks", "up_blocks", "transformer_blocks"):
            mods += list(getattr(denoiser, name, []) or [])
        if getattr(denoiser, "mid_block", None) is not None:
            mods.insert(len(getattr(denoiser, "down_blocks", []) or []), denoiser.mid_block)
        return mods

    # --- images <-> denoiser space ----------------------------------------------------------------
    def to_latents(self, modules: BackboneModules, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """VAE latents ``z * scaling_factor`` (``eps`` samples the posterior; None takes its mean), or
        the images themselves without a VAE (pixel space)."""
        if modules.vae is None:
            return images
        posterior = modules.vae.encode(images).latent_dist
        latents = posterior.mean if eps is None else posterior.mean + posterior.std * eps.to(posterior.mean)
        return latents * modules.vae.config.scaling_factor

    def decode(self, modules: BackboneModules, sample: torch.Tensor) -> torch.Tensor:
        """``vae.decode(sample / scaling_factor)`` (or the sample itself), mapped from [-1, 1] to [0, 1]."""
        if modules.vae is not None:
            sample = modules.vae.decode(sample / modules.vae.config.scaling_factor).sample
        return (sample / 2 + 0.5).clamp(0, 1)

    # --- sampling and training --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, modules: BackboneModules, prompts: Sequence[str], *, denoiser: nn.Module | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The loop of the module docstring with a fresh copy of the backbone's scheduler."""
        denoiser = denoiser if denoiser is not None else modules.denoiser
        param = next(denoiser.parameters())
        scheduler = type(modules.scheduler).from_config(modules.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        b, cfg = len(prompts), guidance_scale > 1.0
        text = self.encode_prompts(modules, list(prompts)).to(param.device, param.dtype)  # (B, L, D)
        if cfg:
            text = torch.cat([self.encode_prompts(modules, [""] * b).to(text), text])  # (2B, L, D)
        x = self.initial_latents(b, latents, generator).to(param.device, param.dtype) \
            * scheduler.init_noise_sigma  # (B, C, H, W)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            pred = self.denoise(denoiser, inp, t.expand(inp.shape[0]).to(param.device), text)
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(pred, t, x, generator=generator).prev_sample
        return self.decode(modules, x).float()

    def initial_latents(self, batch: int, latents: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise (B, C, H, W): ``latents`` checked against the conditioning's shape, or drawn
        from ``generator`` (on its device; CPU without one)."""
        shape = (batch, *self.conditioning().sample_shape)
        if latents is None:
            return torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        if tuple(latents.shape) != shape:
            raise ShapeError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        return latents

    # --- training: noising, target, loss weights ----------------------------------------------
    def add_noise(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's own ``add_noise``: ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (B, C, H, W)."""
        return scheduler.add_noise(x0, noise, timesteps)

    def prediction_type(self, scheduler: Any) -> str:
        """What the denoiser predicts (``epsilon``, ``v_prediction`` or ``sample``): the scheduler's."""
        return scheduler.config.prediction_type

    def snr(self, scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR(t) = a_t / (1 - a_t), (B,) float32, from the scheduler's ``alphas_cumprod`` (T,)."""
        a = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()  # (B,)
        return a / (1 - a)

    def loss_weights(self, scheduler: Any, timesteps: torch.Tensor,
                     min_snr_gamma: float | None) -> torch.Tensor:
        """:func:`min_snr_weights` of :meth:`snr` for :meth:`prediction_type` (B,)."""
        if min_snr_gamma is None or min_snr_gamma <= 0:
            return torch.ones(timesteps.shape[0], device=timesteps.device)
        return min_snr_weights(self.snr(scheduler, timesteps), min_snr_gamma, self.prediction_type(scheduler))

    def training_target(self, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """By the scheduler's ``prediction_type``: ``epsilon`` -> noise, ``v_prediction`` ->
        ``scheduler.get_velocity(x0, noise, t)``, ``sample`` -> x0."""
        kind = self.prediction_type(scheduler)
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return scheduler.get_velocity(x0, noise, timesteps)
        if kind == "sample":
            return x0
        raise ValueError(f"unsupported prediction_type {kind!r}; use 'epsilon', 'v_prediction' or 'sample'.")

    # --- experts on disk --------------------------------------------------------------------------
    def save_denoiser(self, denoiser: nn.Module, directory: str | Path) -> None:
        """:func:`save_denoiser_files`: diffusers' ``save_pretrained`` (``config.json`` of the dense model
        it was cut from + ``diffusion_pytorch_model.safetensors``), else ``model.safetensors``."""
        save_denoiser_files(denoiser, directory)

    def dense_denoiser_for(self, directory: str | Path) -> nn.Module:
        """The diffusers class named in ``directory/config.json`` built from that config (meta
        parameters) when the folder has one, else ``self.build_denoiser('meta')``."""
        model = diffusers_model_from_config(directory)
        return model if model is not None else self.build_denoiser("meta")

    def load_denoiser_state(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """:func:`load_denoiser_files`."""
        return load_denoiser_files(directory)


# ------------------------------------------------------------------------------------ tracer's call
def diffusers_call(denoiser: nn.Module, sample: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> Any:
    """How a bare diffusers denoiser (traced without a backbone) is called: the UNet convention
    ``(sample, timestep, encoder_hidden_states)``, or the DiT / PixArt one ``(hidden_states,
    encoder_hidden_states=, timestep=, added_cond_kwargs=)``. A backbone passes its own call instead
    (:meth:`~aptp.core.interfaces.Backbone.trace_call`: SD3's pooled projection, FLUX's packed latents)."""
    import inspect

    register_diffusers_macs()
    params = inspect.signature(denoiser.forward).parameters
    if "sample" in params or "hidden_states" not in params:
        return denoiser(sample, t, encoder_hidden_states=text, return_dict=False)
    kwargs: dict[str, Any] = {"encoder_hidden_states": text, "timestep": t, "return_dict": False}
    if "added_cond_kwargs" in params:
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return denoiser(sample, **kwargs)


# -------------------------------------------------------------------------------- attention MACs
@functools.lru_cache(maxsize=1)
def attention_types() -> tuple[type, ...]:
    """diffusers' ``Attention`` and the newer per-model attentions (``FluxAttention``, ...)."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # pragma: no cover - older diffusers
        return (Attention,)
    return (Attention, AttentionModuleMixin)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _encoder_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return enc if isinstance(enc, torch.Tensor) else None


def _is_joint(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """SD3 / FLUX joint attention: the text stream has its own q/k/v (``add_q_proj``) and attends with the image."""
    return getattr(module, "add_q_proj", None) is not None and _encoder_states(args, kwargs) is not None


def attention_key_len(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """M of a diffusers ``Attention`` call: the text length for cross-attention, the image plus the
    text length for joint attention, else the query length."""
    inp = _shape(args[0] if args else kwargs.get("hidden_states"))
    n = inp[1] if len(inp) == 3 else inp[2] * inp[3]
    enc = _encoder_states(args, kwargs)
    if enc is None:
        return n
    return n + int(enc.shape[1]) if _is_joint(module, args, kwargs) else int(enc.shape[1])


def attention_macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> float:
    """diffusers ``Attention`` (and ``FluxAttention``): the two attention matmuls, Q K^T and P V."""
    inp = _shape(args[0] if args else kwargs.get("hidden_states"))
    b, n = inp[0], (inp[1] if len(inp) == 3 else inp[2] * inp[3])
    m = attention_key_len(module, args, kwargs)
    if _is_joint(module, args, kwargs):
        n = m  # joint attention: the queries are both streams too
    return 2.0 * b * n * m * module.to_q.out_features  # = 2 B heads N M d


def register_diffusers_macs() -> None:
    """Teach the MACs tracer diffusers' attentions (formula and key length); idempotent."""
    for attention_type in attention_types():  # AttentionModuleMixin is a mixin, no nn.Module
        register_macs_formula(attention_type, attention_macs, key_len=attention_key_len,
                              mixin=not issubclass(attention_type, nn.Module))


# ------------------------------------------------------------------------------------ experts on disk
#: file names :func:`save_denoiser_files` writes
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
MODULE_WEIGHTS = "model.safetensors"


def save_denoiser_files(denoiser: nn.Module, directory: str | Path) -> None:
    """diffusers' ``save_pretrained`` when ``denoiser`` has it, else ``model.safetensors`` of its state dict."""
    directory = Path(directory)
    if hasattr(denoiser, "save_pretrained"):
        denoiser.save_pretrained(str(directory), safe_serialization=True)
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    save_file(state, str(directory / MODULE_WEIGHTS))


def diffusers_model_from_config(directory: str | Path) -> nn.Module | None:
    """The diffusers model that ``directory/config.json`` names (``_class_name``), its parameters on
    the ``meta`` device; None when the folder holds no such config."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    name = json.loads(path.read_text()).get("_class_name")
    if not name:
        return None
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{path} names _class_name={name!r}, which diffusers {diffusers.__version__} does not "
                         "define; install the diffusers version it was saved with, or override "
                         "Backbone.dense_denoiser_for.")
    from accelerate import init_empty_weights

    # Parameters on meta (they are assigned from the saved weights); buffers real, because
    # non-persistent ones (e.g. PixArt's sin-cos position table) are not in the saved state.
    with init_empty_weights(include_buffers=False):
        return cls.from_config(cls.load_config(str(directory)))


def load_denoiser_files(directory: str | Path) -> dict[str, torch.Tensor]:
    """State dict from ``diffusion_pytorch_model.safetensors`` (single or sharded) or ``model.safetensors``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (DIFFUSERS_WEIGHTS, MODULE_WEIGHTS):
        if (directory / name).is_file():
            return load_file(str(directory / name))
    index = directory / f"{DIFFUSERS_WEIGHTS}.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory} holds no {DIFFUSERS_WEIGHTS}, sharded index or {MODULE_WEIGHTS}; "
                                "it is not a saved denoiser (write one with Backbone.save_denoiser).")
    state: dict[str, torch.Tensor] = {}
    root = directory.resolve()
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        path = (directory / str(shard)).resolve()
        if not path.is_relative_to(root) or path.parent != root:
            raise ConfigError(f"{index} names the shard {shard!r}, which is not a file of {directory}; a saved "
                              "denoiser's shards sit beside its index (re-save the model).")
        state.update(load_file(str(path)))
    return state
