"""Fixtures of the routing-analysis tests: one MiniLM encoder per session, two topics with disjoint words."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import interleaved


@pytest.fixture(scope="session")
def encoder():
    from aptp.routers.encoder import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder()
    _ = enc.dim  # load the model once
    return enc


@pytest.fixture(scope="session")
def topic_prompts() -> tuple[list[str], list[str]]:
    return interleaved()


@pytest.fixture(scope="session")
def topic_embeddings(encoder, topic_prompts) -> torch.Tensor:
    return encoder.encode(topic_prompts[0], progress=False)  # (32, 384)


@pytest.fixture(scope="session")
def registry():
    from aptp.core.plugins import default_registry

    return default_registry()
