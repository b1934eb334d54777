"""The world's base model as the framework runs it: the ``world`` backbone preset.

The shipped model (``aptp/assets/world/base``, diffusers layout) is a pixel-space 32x32
``UNet2DConditionModel`` on all-MiniLM-L6-v2 token states. It has no loader, text encoder or
sampler of its own: ``configs/backbone/world.yaml`` names it as the ``unet`` backbone
(``pretrained: aptp:world/base``, ``text_encoder: minilm``, ``text_len: 24``, ``vae: null``), and
everything goes through that backbone::

    bb = backbone()                                   # the registered `unet` backbone, world preset
    modules = bb.load()                               # UNet, its DDPM scheduler, MiniLM + tokenizer
    text = bb.encode_prompts(modules, prompts)        # (B, 24, 384)
    images = bb.generate(modules, prompts, latents=noise)  # (B, 3, 32, 32) in [0, 1]

The harness samples with DDIM on the same schedule (:func:`aptp.harness.deterministic_modules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aptp.core.assets import resolve_asset

__all__ = ["BASE_ASSET", "BASE_DIR", "PRESET", "backbone"]

#: How configs name the shipped base model.
BASE_ASSET = "aptp:world/base"
#: Where it lies inside the package.
BASE_DIR = Path(resolve_asset(BASE_ASSET))


def _preset_path() -> Path:
    from aptp.core.config import BUILTIN_CONFIG_DIR

    return BUILTIN_CONFIG_DIR / "backbone" / "world.yaml"


#: aptp's own preset of the world backbone.
PRESET = _preset_path()


def backbone(registry: Any = None, **overrides: Any) -> Any:
    """The world backbone built through the registry from ``configs/backbone/world.yaml``.

    ``overrides`` replace fields of the preset (e.g. ``pretrained=str(other_dir)``); ``registry``
    defaults to the one the installed plugins provide."""
    from omegaconf import OmegaConf

    from aptp.core.config import instantiate_config

    if registry is None:
        from aptp.core.plugins import default_registry

        registry = default_registry()
    section = OmegaConf.to_container(OmegaConf.load(PRESET))
    section.update(overrides)
    spec = registry["backbone"].get(str(section["name"]))
    return spec.build(instantiate_config(spec, section))
