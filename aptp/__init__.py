"""aptp: prompt-routed pruning of text-to-image diffusion models (APTP, ICLR 2025).

Public entry points::

    from aptp import load_experiment, build, Composition, hookimpl
    cfg = load_experiment("demo", ["router=kmeans"])
    comp = build(cfg)
"""

from __future__ import annotations

__version__ = "0.1.0"

from aptp._compat import ensure_torchvision_importable
ensure_torchvision_importable()  # before anything imports transformers (see aptp/_compat.py)

from aptp.core.build import Composition, build
from aptp.core.config import load_experiment
from aptp.core.hookspecs import hookimpl
from aptp.core.plugins import default_registry, load_registry

__all__ = [
    "Composition",
    "__version__",
    "build",
    "default_registry",
    "hookimpl",
    "load_experiment",
    "load_registry",
]
