"""Input checks shared by the routers and the encoder (clear errors with the value and the fix)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aptp.core.errors import ConfigError, ShapeError


def check_prompts(prompts: Any) -> list[str]:
    """A non-empty list of strings, or ConfigError saying which entry is wrong."""
    if isinstance(prompts, str):
        raise ConfigError(f"prompts must be a list of strings, got one string {prompts[:60]!r}; wrap it: [prompt].")
    if not isinstance(prompts, Sequence):
        raise ConfigError(f"prompts must be a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ConfigError("the prompt list is empty: pass at least one prompt (or a non-empty prompt file).")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(
                f"prompt {i} is a {type(p).__name__} ({p!r:.60}), not a string; pass text prompts only."
            )
    return list(prompts)


def check_embeddings(z: Any, dim: int | None = None, name: str = "embeddings") -> torch.Tensor:
    """A floating (B, D) tensor with B >= 1 (and D == ``dim`` when given), or ShapeError."""
    if not isinstance(z, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of shape (B, D), got {type(z).__name__}.")
    if z.dim() != 2 or z.shape[0] < 1:
        raise ShapeError(
            f"{name} must have shape (B, D) with B >= 1, got {tuple(z.shape)}; "
            "encode a list of prompts with the prompt encoder (a single prompt: z[None])."
        )
    if dim is not None and z.shape[1] != dim:
        raise ShapeError(
            f"{name} have width D={z.shape[1]}, but this router was made for D={dim}; "
            "use the prompt encoder the router was fitted/trained with."
        )
    if not z.is_floating_point():
        raise ShapeError(f"{name} must be floating point, got {z.dtype}.")
    return z


def distinct_prompts(embeddings: torch.Tensor | None = None, prompts: Sequence[str] | None = None) -> int:
    """How many distinct training prompts: distinct texts when ``prompts`` are given, else distinct
    rows of ``embeddings`` (N, D) (one prompt always has one embedding)."""
    if prompts is not None:
        return len(set(prompts))
    if embeddings is None:
        raise ValueError("distinct_prompts needs embeddings or prompts.")
    return int(torch.unique(embeddings.detach().to(torch.float32), dim=0).shape[0])


def check_enough_prompts(num_experts: int, embeddings: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> int:
    """The number M of distinct training prompts, or a ConfigError when ``num_experts`` K > M.

    With more experts than distinct prompts some expert gets no prompt of its own: it is never
    trained on its kind (an empty k-means cluster, an empty group, an expert fine-tuned on what
    another one has), yet the run would succeed and report K experts. Called where a router is
    fitted to, or a pruner holds, its training prompts."""
    n = len(prompts) if prompts is not None else (embeddings.shape[0] if embeddings is not None else 0)
    m = distinct_prompts(embeddings, prompts)
    if num_experts > m:
        repeated = f" ({n} prompts, some repeated)" if n != m else ""
        raise ConfigError(
            f"router.num_experts={num_experts} is more than the {m} distinct training prompts{repeated}: "
            f"every expert needs prompts of its own; lower router.num_experts to <= {m} or train on more "
            "distinct prompts (pruner.data.num_samples, or a larger prompt set)."
        )
    return m
