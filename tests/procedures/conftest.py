"""Fixtures of the procedure tests."""

from __future__ import annotations

import pytest

from runs import PHASE1, run_experiment


@pytest.fixture(scope="session")
def aptp_run(tmp_path_factory):
    """One APTP run with K = 4 experts at target 0.6 (phase 1: 160 steps, phase 2: none)."""
    out = tmp_path_factory.mktemp("aptp_run")
    _, summary = run_experiment(out, PHASE1)
    return out, summary
