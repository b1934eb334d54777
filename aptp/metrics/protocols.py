"""The paper's evaluation prompt sets, from local copies of the datasets.

* :func:`coco2014_val`: COCO-2014 validation, one caption per unique image (chosen with ``seed``),
  then ``limit`` images (30,000 in the paper) drawn with ``seed``; the reference images are those
  images.
* :func:`cc3m_val`: CC3M validation from a TSV with caption and image-path columns (about 14k
  usable pairs in the paper); optionally ``limit`` pairs drawn with ``seed``.

Both return ``(prompts, reference_image_paths)`` in a deterministic order (the dataset's order of
the kept items). :func:`load_images` reads reference images as a (N, 3, R, R) tensor in [0, 1]
(short side resized to R, centre crop: 256 px in the paper).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from aptp.data.captions import CaptionDataset, coco_captions, image_to_tensor, tsv_captions

COCO_EVAL_SIZE = 30_000


def _subset(dataset: CaptionDataset, limit: int | None, seed: int) -> tuple[list[str], list[Path]]:
    records = dataset.records
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for every item), got {limit}.")
        if limit < len(records):
            keep = sorted(random.Random(seed).sample(range(len(records)), limit))
            records = [records[i] for i in keep]
    return [r.caption for r in records], [Path(r.image) for r in records]  # type: ignore[arg-type]


def coco2014_val(annotations: str | Path, image_dir: str | Path, limit: int | None = COCO_EVAL_SIZE,
                 seed: int = 0) -> tuple[list[str], list[Path]]:
    """Prompts and reference image paths of the COCO-2014 val protocol.

    ``annotations``: ``captions_val2014.json``; ``image_dir``: the ``val2014`` folder. One caption
    per image (seeded), then ``limit`` images drawn with ``seed`` (``None``: all 40,504)."""
    dataset = coco_captions(annotations, image_dir, one_per_image=True, seed=seed)
    return _subset(dataset, limit, seed)


def cc3m_val(tsv: str | Path, image_root: str | Path | None = None, limit: int | None = None, seed: int = 0,
             caption_column: str = "caption", image_column: str = "image",
             skip_missing: bool = True) -> tuple[list[str], list[Path]]:
    """Prompts and reference image paths of the CC3M validation protocol.

    ``tsv`` has a header naming the caption and image columns (paths relative to ``image_root``,
    default the TSV's folder). ``skip_missing`` drops rows whose image file is absent (CC3M URLs
    rot: the paper's 14k of the 15.8k validation pairs); then ``limit`` rows drawn with ``seed``."""
    dataset = tsv_captions(tsv, image_root, caption_column=caption_column, image_column=image_column)
    if skip_missing:
        dataset.records = [r for r in dataset.records if Path(r.image).is_file()]  # type: ignore[arg-type]
        if not dataset.records:
            raise FileNotFoundError(f"none of the images listed in {tsv} exist (image root: {image_root or Path(tsv).parent}).")
    return _subset(dataset, limit, seed)


def load_images(paths: Sequence[str | Path], resolution: int = 256) -> torch.Tensor:
    """Images (N, 3, R, R) in [0, 1]: short side resized to ``resolution`` (bicubic), centre crop."""
    if not paths:
        raise ValueError("no image paths given.")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append((image_to_tensor(im, resolution) + 1.0) / 2.0)  # (3, R, R)
        except FileNotFoundError:
            raise FileNotFoundError(f"reference image {p} does not exist.") from None
    return torch.stack(out).clamp(0, 1)
