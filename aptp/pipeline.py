"""Routed inference: route prompts, group them by expert, run each group as one batch.

    pipe = RoutedPipeline(backbone, modules, encoder, router, experts={0: unet0, 1: load_fn})
    out = pipe(["a red circle", "the letter A in blue"], num_inference_steps=25, generator=g)
    out.images      # in the input order
    out.expert_ids  # (B,) the expert each prompt ran on

Seeds follow diffusers' conventions: ``generator`` is one generator (noise drawn for the whole list
in input order) or a list with one per prompt (each prompt's noise from its own generator, so an
image does not depend on the batch it was generated in); ``latents=`` gives the initial noise.

The text encoder and VAE (``modules``) are shared by every expert; experts are kept resident or
loaded lazily (a value of ``experts`` may be a zero-argument loader instead of a module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from omegaconf import OmegaConf
from torch import nn

from aptp.core.interfaces import Backbone, BackboneModules, PromptEncoder, Router
from aptp.core.registry import Registry
from aptp.pruners.expert import gathered

ExpertSource = nn.Module | Callable[[], nn.Module]


@dataclass
class RoutedOutput:
    images: Any  # list of PIL images, (B, 3, H, W) tensor in [0, 1], or (B, H, W, 3) array
    expert_ids: torch.Tensor  # (B,) long


def check_prompts(prompts: Sequence[str], max_prompts: int | None = None) -> list[str]:
    """A list of non-empty strings, or a ValueError/TypeError saying which entry is wrong."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("got an empty prompt list; pass at least one prompt.")
    if max_prompts is not None and len(prompts) > max_prompts:
        raise ValueError(f"got {len(prompts)} prompts, more than max_prompts={max_prompts}; split the list.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__} ({p!r}); every prompt must be a string.")
    return prompts


class RoutedPipeline:
    """Prompt-routed text-to-image generation over K experts of one backbone."""

    def __init__(self, backbone: Backbone, modules: BackboneModules, encoder: PromptEncoder, router: Router,
                 experts: Mapping[int, ExpertSource], max_batch_size: int = 16, resident: bool = True,
                 kept_ratios: torch.Tensor | None = None) -> None:
        missing = set(range(router.num_experts)) - set(experts)
        if missing:
            raise ValueError(f"no expert given for ids {sorted(missing)}; the router has {router.num_experts} experts.")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.backbone, self.modules, self.encoder, self.router = backbone, modules, encoder, router
        self._sources = dict(experts)
        self._resident: dict[int, nn.Module] = {k: v for k, v in experts.items() if isinstance(v, nn.Module)}
        self.max_batch_size = max_batch_size
        self.resident = resident
        self.kept_ratios = kept_ratios  # (K,) each expert's kept-MACs ratio, when known

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 16, resident: bool = True, registry: Registry | None = None,
                 modules: BackboneModules | None = None, shared: bool = False) -> RoutedPipeline:
        """Load the output of ``aptp run`` (``config.yaml``, ``router/``, ``experts/expert-k``); experts
        are loaded lazily on first use. ``modules``: the already loaded parts of the same backbone
        (text encoder, scheduler, VAE) to share instead of loading them again. Experts saved with
        shared storage take their weights from ``modules.denoiser`` (the one dense copy):
        ``shared=True`` keeps them as :class:`~aptp.pruners.expert.SharedExpert` (one dense copy plus
        K diffs resident), ``shared=False`` materialises each (plain diffusers models)."""
        from aptp.core.config import instantiate_config, validate
        from aptp.core.plugins import default_registry
        from aptp.pruners.expert import load_expert
        from aptp.routers.bundle import load_router_bundle

        run_dir = Path(run_dir)
        registry = registry or default_registry()
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not an aptp run folder: config.yaml is missing.")
        config = validate(OmegaConf.load(run_dir / "config.yaml"), registry, str(run_dir / "config.yaml"))
        spec = registry["backbone"].get(config.backbone.name)
        backbone = spec.build(instantiate_config(spec, config.backbone))
        bundle = load_router_bundle(run_dir / "router", registry)
        folders = [run_dir / "experts" / f"expert-{k}" for k in range(bundle.num_experts)]
        for k, folder in enumerate(folders):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is missing: the run did not finish expert {k} (rerun to resume).")
        modules = modules if modules is not None else backbone.load(device=device, dtype=dtype)
        experts: dict[int, ExpertSource] = {
            k: functools.partial(load_expert, folder, device, dtype, dense=modules.denoiser,
                                 materialise=not shared, registry=registry)
            for k, folder in enumerate(folders)}
        return cls(backbone, modules, bundle.encoder, bundle.router, experts, max_batch_size=max_batch_size,
                   resident=resident, kept_ratios=bundle.kept_ratios())

    def expert(self, k: int) -> nn.Module:
        """Expert ``k``, loading it if it is not resident."""
        if k in self._resident:
            return self._resident[k]
        module = self._sources[k]()  # type: ignore[operator]
        module.eval()
        if self.resident:
            self._resident[k] = module
        return module

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> torch.Tensor:
        """Expert id of each prompt, (B,) long (inference routing: argmax, no balancing)."""
        prompts = check_prompts(prompts)
        if self.router.num_experts == 1:  # one expert (dense, static): nothing to encode
            return torch.zeros(len(prompts), dtype=torch.long)
        z = self.encoder.encode(prompts)  # (B, D)
        self.router.eval()
        return self.router.route(z).expert_ids

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 output_type: Literal["pil", "pt", "np"] = "pil", latents: torch.Tensor | None = None) -> RoutedOutput:
        prompts = check_prompts(prompts)
        expert_ids = self.route(prompts)  # (B,)
        shape = (len(prompts), *self.backbone.conditioning().sample_shape)
        latents = initial_noise(shape, generator, latents)  # (B, C, H, W), input order
        # a list of generators seeds the initial noise only; a stochastic scheduler's step noise then
        # comes from the global RNG (diffusers' deterministic samplers, e.g. DDIM, draw none)
        generator = generator if isinstance(generator, torch.Generator) else None
        images: torch.Tensor | None = None
        for k in expert_ids.unique().tolist():
            idx = (expert_ids == k).nonzero().flatten()  # prompts of expert k, input order
            denoiser = self.expert(k)
            for chunk in idx.split(self.max_batch_size):
                with gathered(denoiser):  # a shared expert gathers its weights once for all the steps
                    out = self.backbone.generate(
                        self.modules, [prompts[i] for i in chunk.tolist()], denoiser=denoiser,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, latents=latents[chunk],
                    ).cpu()  # (b, 3, H, W)
                if images is None:
                    images = torch.empty(len(prompts), *out.shape[1:])
                images[chunk] = out
        assert images is not None
        return RoutedOutput(to_output_type(images, output_type), expert_ids)


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None = None,
                  latents: torch.Tensor | None = None) -> torch.Tensor:
    """The initial noise (B, ...) of a batch: ``latents`` when given (checked), else drawn from one
    generator for the whole batch, or from one generator per prompt (a list of B generators)."""
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)} (one per prompt), got {tuple(latents.shape)}.")
        return latents
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for {shape[0]} prompts; pass one per prompt or a single one.")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu() for g in generators])


def prompt_noise(shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
    """Initial noise (B, ...) where row i depends only on ``seeds[i]`` (CPU generator): the same
    prompt and seed get the same noise in every model and in every batch."""
    return initial_noise(shape, [torch.Generator().manual_seed(int(s)) for s in seeds])


def to_output_type(images: torch.Tensor, output_type: str) -> Any:
    """(B, 3, H, W) in [0, 1] -> 'pt' as is, 'np' (B, H, W, 3) float, 'pil' list of images."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}.")
