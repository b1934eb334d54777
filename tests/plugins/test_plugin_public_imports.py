"""Plugins use aptp's public API only: no plugin module imports a private aptp module (a dotted path
with a component starting with ``_``, e.g. ``aptp._compat`` or ``aptp.pruners.granularities._modules``)
or a private name (``from aptp.core.resources import _attention_types``).

The check reads the plugins' source with :mod:`ast` (nothing is imported, so it runs without the
plugins installed); what a plugin needs from aptp belongs in a public module, e.g. the unit-space
toolkit :mod:`aptp.pruners.granularities.toolkit`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aptp.testing import imported_modules

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
SOURCES = sorted(p for p in PLUGINS.glob("*/**/*.py") if ".egg-info" not in str(p))


def _private(dotted: str) -> bool:
    """Whether an ``aptp`` dotted path names a private module or name (a ``_x`` component)."""
    parts = dotted.split(".")
    return parts[0] == "aptp" and any(p.startswith("_") for p in parts[1:])


def private_aptp_imports(source: str) -> list[str]:
    """``line: what`` for every import of a private aptp module or name in ``source``."""
    return [f"{line}: {n}" for line, n in imported_modules(source) if _private(n)]


def test_there_are_plugin_sources():
    assert any(p.parts[-2] == "aptp_timm" for p in SOURCES), f"no plugin source found under {PLUGINS}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugin_imports_only_public_aptp_modules(path: Path):
    bad = private_aptp_imports(path.read_text())
    assert not bad, (f"{path.relative_to(PLUGINS)} imports private aptp modules or names {bad}; import them from "
                     "a public module (e.g. aptp.pruners.granularities.toolkit) or make what it needs public.")


@pytest.mark.parametrize("line", [
    "from aptp._compat import ensure_torchvision_importable",
    "import aptp._compat",
    "from aptp.pruners.granularities._modules import ResidualBypass",
    "from aptp.pruners.granularities import _modules",
    "from aptp.core.resources import _attention_types",
    "import importlib; importlib.import_module('aptp.metrics._common')",
])
def test_the_check_sees_private_imports(line: str):
    assert private_aptp_imports(line)


@pytest.mark.parametrize("line", [
    "import aptp",
    "from aptp import hookimpl",
    "from aptp.pruners.granularities.toolkit import HookHandles, trace",
    "from . import _private_to_the_plugin",
    "from aptp_timm._x import y",
])
def test_the_check_lets_public_imports_pass(line: str):
    assert not private_aptp_imports(line)
