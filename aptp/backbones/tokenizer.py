"""A byte-level CLIP tokenizer generated locally (no hub): every UTF-8 byte is a token.

Random-weight builds (``tiny``, ``sd21`` without ``pretrained``) need a tokenizer that a stock
diffusers pipeline accepts. CLIP's BPE with an empty merge list splits words into bytes; the
vocabulary is the 256 byte symbols, the same with CLIP's end-of-word suffix ``</w>``, and the two
special tokens (ids 512 and 513).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


@lru_cache(maxsize=1)
def _files() -> Path:
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    root = Path(tempfile.mkdtemp(prefix="aptp-byte-clip-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the tokenizer has read them by then
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return root


def byte_clip_tokenizer(max_length: int = 77):
    """A ``CLIPTokenizer`` over bytes (vocabulary 514, pad = end token), ``model_max_length`` = ``max_length``."""
    from transformers import CLIPTokenizer

    root = _files()
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=max_length)


BYTE_CLIP_VOCAB = 514
BYTE_CLIP_BOS, BYTE_CLIP_EOS = 512, 513
