"""``aptp/core`` holds contracts and shared types only: no module of it imports a model library
(diffusers, transformers), not even lazily inside a function. What knows diffusers is a backbone
(:mod:`aptp.backbones.diffusers_base`: sampling, file I/O, the attention MACs formulas).

The check reads the source with :mod:`ast` (nothing is imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aptp.testing import imported_modules

CORE = Path(__file__).resolve().parents[2] / "aptp" / "core"
SOURCES = sorted(CORE.rglob("*.py"))
MODEL_LIBRARIES = ("diffusers", "transformers")


def model_library_imports(source: str) -> list[str]:
    """``line: module`` for every import of a model library in ``source`` (top level or in a function,
    ``import x``, ``from x import y``, ``importlib.import_module('x')``, ``__import__('x')``)."""
    return [f"{line}: {n}" for line, n in imported_modules(source) if n.split(".")[0] in MODEL_LIBRARIES]


def test_there_are_core_sources():
    assert CORE / "interfaces.py" in SOURCES and CORE / "resources.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_imports_no_model_library(path: Path):
    bad = model_library_imports(path.read_text())
    assert not bad, (f"aptp/core/{path.relative_to(CORE)} imports {bad}; the core keeps contracts only: move what "
                     "needs the library into a backbone (aptp/backbones/, e.g. diffusers_base.py).")


@pytest.mark.parametrize("line", [
    "import diffusers",
    "from diffusers import UNet2DConditionModel",
    "def f():\n    from diffusers.models.attention_processor import Attention",
    "import transformers.models.clip",
    "from transformers import CLIPTextModel",
    "import importlib; importlib.import_module('diffusers')",
])
def test_the_check_sees_model_library_imports(line: str):
    assert model_library_imports(line)


@pytest.mark.parametrize("line", [
    "import torch",
    "from aptp.core.units import UnitSpace",
    "from aptp.backbones.diffusers_base import DiffusersBackbone",
    "from . import diffusers_like",
])
def test_the_check_lets_other_imports_pass(line: str):
    assert not model_library_imports(line)


def test_the_backbone_contract_is_declared_in_the_core():
    """Every part of the Backbone contract is a declared method of the core ABC, implemented for
    diffusers models in aptp.backbones.diffusers_base."""
    from aptp.backbones.diffusers_base import DiffusersBackbone
    from aptp.core.interfaces import Backbone

    declared = {"conditioning", "load", "build_denoiser", "denoise", "encode_prompts", "feature_modules",
                "to_latents", "decode", "generate", "training_target", "save_denoiser", "dense_denoiser_for",
                "load_denoiser_state"}
    assert declared <= Backbone.__abstractmethods__
    assert callable(Backbone.trace_call)
    assert DiffusersBackbone.__abstractmethods__ == {"conditioning", "load", "build_denoiser", "denoise",
                                                     "encode_prompts"}
