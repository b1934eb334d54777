"""``clip_score``: prompt-image agreement, 100 x the cosine similarity of CLIP embeddings.

    CLIPScore = mean_i 100 * max(cos(E_I(image_i), E_T(prompt_i)), 0)        (clamp="image")

the formula torchmetrics documents (and Hessel et al. 2021 with w = 100). torchmetrics' code
clamps the *mean* instead, ``max(mean_i 100 * cos_i, 0)``: ``clamp="mean"`` reproduces that. The
two agree whenever no cosine is negative, which is the case with trained CLIP models on real
prompt-image pairs (typical values 0.2-0.35). The paper reports OpenAI CLIP ViT-B/32.

Preprocessing is CLIPProcessor's, done in torch: resize the short side to the model's size
(antialiased bicubic, like PIL), centre crop, normalise with the model's mean / std. Prompts are
tokenised with the model's tokenizer (or ``tokenizer``), truncated to the text tower's length.
Weights are loaded on the first :meth:`compute`, not when the component is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from aptp.metrics import _clip
from aptp.metrics._common import check_images, check_prompts

CLAMPS = ("image", "mean")


@dataclass
class ClipScoreConfig:
    """Parameters of ``clip_score``."""

    model: str = "openai/clip-vit-base-patch32"  # a local CLIPModel folder (or a cached hub id)
    tokenizer: Optional[str] = None  # tokenizer folder; default: the model folder
    batch_size: int = 64
    device: str = "cpu"
    clamp: str = "image"  # "image": mean of per-image max(., 0); "mean": torchmetrics' max(mean, 0)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("clip_score: model must name a CLIPModel folder or hub id, got an empty string.")
        if self.batch_size < 1:
            raise ValueError(f"clip_score: batch_size must be >= 1, got {self.batch_size}.")
        if self.clamp not in CLAMPS:
            raise ValueError(f"clip_score: clamp must be one of {CLAMPS}, got {self.clamp!r}.")


class ClipScore(_clip.ClipMetric):
    """CLIP score: 100 x cosine(image, prompt) with a CLIP model, averaged over images."""

    config_class = ClipScoreConfig
    name: ClassVar[str] = "clip_score"
    higher_is_better: ClassVar[bool] = True
    uses_text: ClassVar[bool] = True

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image 100 * cos(image, prompt), (N,) float32, not clamped."""
        images = check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        clip = self.load()
        img = _clip.image_embeddings(clip, images, self.config.batch_size, geometry="crop")  # (N, P)
        txt = _clip.text_embeddings(clip, prompts, self.config.batch_size)  # (N, P)
        return 100.0 * (img * txt).sum(dim=-1)  # (N,)

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """CLIP score of the set (``reference`` is not used)."""
        s = self.scores(images, prompts).double()  # (N,)
        if self.config.clamp == "image":
            return float(s.clamp(min=0).mean())
        return float(s.mean().clamp(min=0))
