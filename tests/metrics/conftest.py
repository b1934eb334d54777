"""Tiny stand-ins for the metrics' pretrained weights, written to a temporary folder once per session.

* ``tiny_clip_dir``: a RANDOM transformers ``CLIPModel`` (text / vision width 32, 2 layers, 32 px
  images, patch 8, projection 16) saved with ``save_pretrained``, with a ``CLIPTokenizer`` built
  offline from a byte-level character vocabulary (no merges) and a ``preprocessor_config.json``.
  It exercises exactly the loading and preprocessing code a real CLIP folder goes through.
* ``tiny_inception_path``: a TorchScript module with the calling convention of clean-fid's
  ``inception-2015-12-05.pt`` (``model(x, return_features=True)`` on float images in [0, 255] of
  299 x 299 -> features (N, 16) from a fixed random projection of 4 x 4 average-pooled pixels). It
  raises on any other input size or range, so it also checks what the metric feeds it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from metrics_helpers import TinyInception


@pytest.fixture(scope="session")
def tiny_inception_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.1x
        torch.jit.script(TinyInception()).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("tiny_clip")
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    tokenizer.save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
