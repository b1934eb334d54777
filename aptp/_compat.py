"""Import-time compatibility fixes for the environments aptp runs in.

:func:`ensure_torchvision_importable` -- torchvision wheels are built against one torch build. With
``torch==2.13.0`` pinned (the CPU build), pip resolves ``torchvision==0.28.0``, a *CUDA* wheel whose
C++ extension (``torchvision/_C*.so``) does not load on the CPU torch. ``import torchvision`` then
fails in ``torchvision/_meta_registrations.py``::

    RuntimeError: operator torchvision::nms does not exist

because it registers fake (meta) kernels for the operators ``torchvision::nms`` and
``torchvision::qnms`` that only the extension defines. transformers notices an installed
torchvision and imports it, so ``transformers``, ``diffusers`` and ``sentence_transformers`` break
too -- anything in aptp. The guard defines the two operator *schemas* (no kernels) when, and only
when, the extension cannot be loaded; torchvision's own fake registrations then succeed and the
pure-Python parts (transforms, models, everything timm uses) import normally. Calling a detection
op (``torchvision.ops.nms``) still fails, as it would without the extension.

With a torchvision whose extension loads (a matching CPU or CUDA build) the guard does nothing:
defining the schemas there would collide with the real ones. Without torchvision it costs one
``importlib.util.find_spec``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

#: The ``torch.library.Library`` holding the stand-in schemas; kept alive for the process.
_TORCHVISION_LIB: Any = None
_CHECKED = False

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _extension_loads(package_dir: str) -> bool:
    """Whether torchvision's compiled extension loads into this torch (True if there is none to try)."""
    import torch

    candidates = sorted(glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work on a torch its C++ extension was not built for.

    Returns True when the stand-in schemas were defined (now or by an earlier call), False when
    nothing was needed (no torchvision installed, already imported, or its extension loads).
    Idempotent and cheap; call it before importing torchvision, timm or transformers.
    """
    global _TORCHVISION_LIB, _CHECKED
    if _CHECKED:
        return _TORCHVISION_LIB is not None
    _CHECKED = True
    import sys

    if "torchvision" in sys.modules:  # imported already (successfully or not): too late to help
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if hasattr(torch.ops, "torchvision") and _has_op("nms"):
        return False  # defined by a loaded extension (or an earlier guard)
    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _TORCHVISION_LIB = lib
    return True


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
