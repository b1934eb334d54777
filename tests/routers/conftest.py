"""Shared fixtures of the router tests: one MiniLM encoder per session, a tiny unit space."""

from __future__ import annotations

import pytest
from routing_helpers import PROMPTS, make_unit_space

from aptp.core.units import UnitSpace


@pytest.fixture(scope="session")
def encoder():
    from aptp.routers.encoder import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder()
    _ = enc.dim  # load once
    return enc


@pytest.fixture(scope="session")
def embeddings(encoder):
    return encoder.encode(PROMPTS)  # (12, 384)


@pytest.fixture
def unit_space() -> UnitSpace:
    return make_unit_space()


@pytest.fixture(scope="session")
def registry():
    from aptp.core.plugins import default_registry

    return default_registry()


