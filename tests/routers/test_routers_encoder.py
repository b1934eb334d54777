"""The sentence-transformers prompt encoder: default model offline, cache, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from routing_helpers import PROMPTS

from aptp.core.errors import ConfigError
from aptp.routers.encoder import SentenceTransformerConfig, SentenceTransformerEncoder


def test_default_is_packaged_minilm(encoder):
    assert encoder.dim == 384
    z = encoder.encode(PROMPTS[:3])
    assert z.shape == (3, 384) and z.dtype == torch.float32 and z.device.type == "cpu"


def test_cache_returns_identical_embeddings_without_reencoding(encoder):
    encoder.clear_cache()
    first = encoder.encode(PROMPTS)
    misses = encoder.cache_misses
    again = encoder.encode(list(reversed(PROMPTS)) + PROMPTS[:2])
    assert encoder.cache_misses == misses, "cached prompts were encoded again"
    assert torch.equal(again[: len(PROMPTS)], first.flip(0)) and torch.equal(again[-2:], first[:2])


def test_uncached_encoder_agrees_and_is_deterministic(encoder):
    plain = SentenceTransformerEncoder(SentenceTransformerConfig(cache_size=0, batch_size=5))
    plain._model = encoder.model  # share the loaded weights: the test is about batching and caching
    a, b = plain.encode(PROMPTS), plain.encode(PROMPTS)
    assert torch.equal(a, b)
    assert torch.allclose(a, encoder.encode(PROMPTS), atol=1e-5)
    assert plain.cache_hits == 0


def test_duplicates_in_one_call_are_encoded_once(encoder):
    encoder.clear_cache()
    before = encoder.cache_misses
    z = encoder.encode(["a cat", "a cat", "a dog", "a cat"])
    assert encoder.cache_misses - before == 2
    assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[3])


def test_cache_is_bounded(encoder):
    enc = SentenceTransformerEncoder(SentenceTransformerConfig(cache_size=2))
    enc._model = encoder.model  # share the loaded weights
    enc.encode(["a", "b"])
    enc.encode(["c"])
    assert list(enc._cache) == ["b", "c"]


@pytest.mark.parametrize("model", ["/does/not/exist", "./no-such-model", "sentence-transformers/all-mpnet-base-v2"])
def test_missing_model_says_pass_a_local_path(model):
    with pytest.raises(ConfigError, match="local path"):
        _ = SentenceTransformerEncoder(SentenceTransformerConfig(model=model)).dim


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="batch_size=0"):
        SentenceTransformerConfig(batch_size=0)
    with pytest.raises(ValueError, match="cache_size=-1"):
        SentenceTransformerConfig(cache_size=-1)


def test_progress_bar_only_when_asked_or_on_a_tty(encoder, capsys):
    enc = SentenceTransformerEncoder(SentenceTransformerConfig(batch_size=4, cache_size=0))
    enc._model = encoder.model
    enc.encode(PROMPTS)  # not a TTY under pytest: no bar
    assert "encoding prompts" not in capsys.readouterr().err
    enc.encode(PROMPTS, progress=True)
    assert "encoding prompts" in capsys.readouterr().err
