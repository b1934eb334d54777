"""aptp-timm: an aptp plugin built on timm.

* backbone ``timm_dit`` -- a DiT-style denoiser whose body is timm's Vision Transformer
  :class:`timm.models.vision_transformer.Block` s, conditioned in context on prompt token states
  (see :mod:`aptp_timm.model`);
* granularities ``timm_heads`` (heads of timm's fused-qkv ``Attention``), ``timm_mlp`` (hidden
  width of timm's ``Mlp``) and ``timm_blocks`` (whole ``Block`` s as residual bypasses), generic over
  any model made of those timm modules (see :mod:`aptp_timm.granularities`).

aptp finds them only through this distribution's ``[project.entry-points.aptp]``
(``aptp_timm = "aptp_timm.plugin"``); block them with ``APTP_BLOCK_PLUGINS=aptp_timm``.

Presets for ``aptp run`` / ``aptp compare`` ship in :data:`CONFIG_DIR`, which the plugin's
``aptp_config_dirs`` hook puts on aptp's preset search path (no flag or variable needed).
"""

from __future__ import annotations

from pathlib import Path

# Importing aptp first makes torchvision importable (the CPU-torch / CUDA-torchvision wheel guard
# that ``import aptp`` runs) before any module of this package imports timm, which imports it.
import aptp  # noqa: F401

__version__ = "0.1.0"

#: Folder of this plugin's presets (``backbone/timm_dit.yaml``, ``granularity/timm.yaml``, ...).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
