"""Loading a transformers ``CLIPModel`` from a local folder (or a cached hub id) and embedding images
and prompts with it, preprocessing done in torch on (N, 3, H, W) tensors in [0, 1].

The image preprocessing reads the model folder's ``preprocessor_config.json`` when there is one
(resize size, crop size, mean, std) and otherwise uses the model's ``image_size`` and OpenAI CLIP's
mean / std. transformers' own image processors are not used: without torchvision they fall back to
PIL and need uint8 arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from aptp.core.interfaces import Metric
from aptp.metrics._common import MissingWeightsError, batches, resize, resize_shortest_center_crop

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedClip:
    """A CLIP model with what its preprocessing needs."""

    model: Any  # transformers.CLIPModel, eval mode
    tokenizer: Any  # a transformers tokenizer, or None when only images are embedded
    image_size: int  # side of the square the vision tower takes (crop size)
    resize_size: int  # short side after resizing, before the centre crop
    mean: torch.Tensor  # (3,)
    std: torch.Tensor  # (3,)
    max_text_len: int  # tokens, including start and end tokens
    device: torch.device


def _looks_like_path(ref: str) -> bool:
    return Path(ref).expanduser().is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def _missing(what: str, ref: str, key: str, metric: str, exc: Exception, hub_id: str) -> MissingWeightsError:
    hub_id = hub_id if _looks_like_path(ref) else ref
    name = Path(hub_id).name
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return MissingWeightsError(
        f"{metric}: cannot load the CLIP {what} {ref!r} ({type(exc).__name__}: {detail}). "
        "Download the model once where the Hugging Face hub is reachable (e.g. "
        f"`huggingface-cli download {hub_id} --local-dir /path/to/{name}`) and set the metric's "
        f"`{key}` to that folder (e.g. `metrics[0].{key}=/path/to/{name}`)."
    )


def _from_pretrained(cls: Any, ref: str, what: str, key: str, metric: str, hub_id: str) -> Any:
    """``cls.from_pretrained(ref)``: a folder directly; a path that does not exist fails at once; a hub
    id is looked up in the local cache first and only then on the hub (which retries for ~30 s offline)."""
    path = Path(ref).expanduser()
    if _looks_like_path(ref) and not path.exists():
        raise _missing(what, ref, key, metric, FileNotFoundError(f"{path} does not exist"), hub_id)
    try:
        if path.is_dir():
            return cls.from_pretrained(str(path))
        try:
            return cls.from_pretrained(ref, local_files_only=True)
        except (OSError, ValueError):
            return cls.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise _missing(what, ref, key, metric, exc, hub_id) from exc


def _preprocessor_dict(ref: str) -> dict[str, Any]:
    """The model's preprocessor_config.json as a dict, or {} when it has none."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(ref)
    except (OSError, ValueError):
        return {}
    return config


def load_clip(model_ref: str, tokenizer_ref: str | None, device: str, with_tokenizer: bool,
              metric: str, hub_id: str) -> LoadedClip:
    """Load CLIP weights (and the tokenizer, from ``tokenizer_ref`` or the model folder); ``hub_id``
    is the model the error message suggests downloading when ``model_ref`` is a missing folder."""
    from transformers import AutoTokenizer, CLIPModel

    model = _from_pretrained(CLIPModel, model_ref, "model", "model", metric, hub_id).eval().to(device)
    model.requires_grad_(False)
    tokenizer = None
    if with_tokenizer:
        ref = tokenizer_ref or model_ref
        tokenizer = _from_pretrained(AutoTokenizer, ref, "tokenizer", "tokenizer" if tokenizer_ref else "model",
                                     metric, hub_id)
    vision = model.config.vision_config
    pre = _preprocessor_dict(model_ref)
    crop = pre.get("crop_size", vision.image_size)
    crop = int(crop["height"]) if isinstance(crop, dict) else int(crop)
    size = pre.get("size", crop)
    size = int(size.get("shortest_edge", size.get("height", crop))) if isinstance(size, dict) else int(size)
    if crop != vision.image_size:
        raise ValueError(
            f"{metric}: {model_ref} crops images to {crop} px but its vision tower takes {vision.image_size} px."
        )
    text_len = int(model.config.text_config.max_position_embeddings)
    if tokenizer is not None and getattr(tokenizer, "model_max_length", None):
        text_len = min(text_len, int(tokenizer.model_max_length))
    return LoadedClip(
        model=model, tokenizer=tokenizer, image_size=int(vision.image_size), resize_size=size,
        mean=torch.tensor(pre.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32),
        std=torch.tensor(pre.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32),
        max_text_len=text_len, device=torch.device(device),
    )


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def preprocess(clip: LoadedClip, images: torch.Tensor, geometry: str) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> normalised pixel values (N, 3, S, S).

    ``geometry="crop"``: CLIPProcessor's resize of the short side + centre crop (CLIP score);
    ``"squash"``: resize the whole image to S x S (CMMD's reference preprocessing)."""
    if geometry == "crop":
        x = resize_shortest_center_crop(images, clip.resize_size, clip.image_size)
    elif geometry == "squash":
        x = resize(images, (clip.image_size, clip.image_size), "bicubic")
    else:
        raise ValueError(f"geometry must be 'crop' or 'squash', got {geometry!r}.")
    mean, std = clip.mean.to(x), clip.std.to(x)
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def image_embeddings(clip: LoadedClip, images: torch.Tensor, batch_size: int, geometry: str) -> torch.Tensor:
    """L2-normalised image embeddings (N, P), float32 on CPU."""
    out = []
    for sl in batches(images.shape[0], batch_size):
        x = preprocess(clip, images[sl].to(clip.device, torch.float32), geometry)  # (b, 3, S, S)
        e = _pooled(clip.model.get_image_features(pixel_values=x)).float()  # (b, P)
        out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(clip: LoadedClip, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """L2-normalised text embeddings (N, P), float32 on CPU. Prompts longer than the model's text
    length are truncated by the tokenizer (the end token kept, like OpenAI's ``clip.tokenize``)."""
    out = []
    for sl in batches(len(prompts), batch_size):
        tok = clip.tokenizer(list(prompts[sl]), padding=True, truncation=True, max_length=clip.max_text_len,
                             return_tensors="pt")
        e = _pooled(clip.model.get_text_features(input_ids=tok["input_ids"].to(clip.device),
                                                 attention_mask=tok["attention_mask"].to(clip.device))).float()
        out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
    return torch.cat(out)


class ClipMetric(Metric):
    """A metric on CLIP embeddings: loads the CLIP model of ``config.model`` (and, with
    ``uses_text``, the tokenizer of ``config.tokenizer``) on first use, never when built."""

    uses_text: ClassVar[bool] = False
    requires_weights: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._clip: LoadedClip | None = None

    def can_probe(self) -> bool:
        """Never: the contract probe must not load user-provided (and large) weights."""
        return False

    def load(self) -> LoadedClip:
        """The CLIP model (and tokenizer), loaded once."""
        if self._clip is None:
            c = self.config
            self._clip = load_clip(c.model, c.tokenizer if self.uses_text else None, c.device,
                                   with_tokenizer=self.uses_text, metric=self.name, hub_id=type(c).model)
        return self._clip
