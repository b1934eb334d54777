"""Routers and backbones do not know each other (docs/architecture.md, "the rules"): no module of
``aptp/routers`` imports ``aptp.backbones`` and no module of ``aptp/backbones`` imports
``aptp.routers`` — they meet only in the pipeline and the pruners, through the core's contracts.
The check reads the source with :mod:`ast` (nothing is imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aptp.testing import imported_modules

APTP = Path(__file__).resolve().parents[2] / "aptp"
ROOMS = {"routers": "aptp.backbones", "backbones": "aptp.routers"}  # room -> what it may not import


def imports_of(source: str, banned: str) -> list[str]:
    """``line: module`` for every import of ``banned`` (or a submodule) in ``source``."""
    return [f"{line}: {n}" for line, n in imported_modules(source) if n == banned or n.startswith(banned + ".")]


@pytest.mark.parametrize("room,banned", ROOMS.items())
def test_routers_and_backbones_do_not_import_each_other(room: str, banned: str):
    sources = sorted((APTP / room).rglob("*.py"))
    assert sources, f"aptp/{room} has no modules"
    bad = {str(p.relative_to(APTP)): hits for p in sources if (hits := imports_of(p.read_text(), banned))}
    assert not bad, f"aptp/{room} imports {banned}: {bad}; they meet only through aptp.core's contracts."


@pytest.mark.parametrize("line", ["import aptp.routers.ot", "from aptp.routers import ot",
                                  "def f():\n    from aptp.routers.encoder import X", "from aptp import routers"])
def test_the_check_sees_an_import(line: str):
    assert imports_of(line, "aptp.routers")


def test_the_check_ignores_other_modules():
    assert not imports_of("import aptp.router_utils\nfrom aptp.core import interfaces", "aptp.routers")
