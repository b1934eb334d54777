"""Fixtures of the core tests."""

from __future__ import annotations

import pytest

from adhoc_plugin import AdHocPlugin
from aptp.core.plugins import load_registry


@pytest.fixture
def adhoc_registry():
    return load_registry(extra_plugins=[AdHocPlugin()])


@pytest.fixture
def preset_dir(tmp_path):
    """A config folder with presets for the ad-hoc router and an experiment composing them."""
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "proj3.yaml").write_text("name: projection\nnum_experts: 3\n")
    (tmp_path / "router" / "proj5.yaml").write_text("name: projection\nnum_experts: 5\ndim: 4\n")
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "exp.yaml").write_text(
        "defaults:\n  - router: proj3\nname: exp\nseed: 3\nrouter:\n  dim: 6\n"
    )
    return tmp_path
