"""Caption datasets from the local files users have: COCO captions, CC3M-style TSV, WebDataset
shards and folders of image + ``.txt`` pairs.

Every dataset yields ``{"image": (3, R, R) float tensor in [-1, 1], "caption": str}``. A missing or
malformed file raises an error naming the file; a corrupt image is skipped and counted
(``dataset.num_corrupt``), never fatal. Use :func:`collate_captions` as the DataLoader's
``collate_fn`` so skipped items are dropped from the batch.
"""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1]: (3, R, R)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, R, R)
    return x / 127.5 - 1.0


@dataclass(frozen=True)
class CaptionRecord:
    caption: str
    image: str | Path | None  # a path, or a member name inside a tar shard
    shard: Path | None = None


class CaptionDataset(Dataset):
    """Base: a list of :class:`CaptionRecord`, decoded lazily."""

    def __init__(self, records: Sequence[CaptionRecord], resolution: int = 256) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
        self.records = list(records)
        self.resolution = resolution
        self.num_corrupt = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def _open(self, record: CaptionRecord) -> Image.Image:
        if record.shard is not None:
            with tarfile.open(record.shard) as tar:
                data = tar.extractfile(str(record.image)).read()  # type: ignore[union-attr]
            return Image.open(io.BytesIO(data))
        return Image.open(record.image)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        try:
            with self._open(record) as image:
                pixels = image_to_tensor(image, self.resolution)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            self.num_corrupt += 1
            return None
        return {"image": pixels, "caption": record.caption}


def collate_captions(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack a batch, dropping the items that were skipped as corrupt."""
    kept = [it for it in items if it is not None]
    if not kept:
        return {"image": torch.empty(0, 3, 0, 0), "caption": []}
    return {"image": torch.stack([it["image"] for it in kept]), "caption": [it["caption"] for it in kept]}


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    return path


def coco_captions(annotations: str | Path, image_dir: str | Path, resolution: int = 256,
                  one_per_image: bool = False, seed: int = 0) -> CaptionDataset:
    """COCO ``captions_*.json`` + image folder. ``one_per_image`` keeps one caption per unique
    image, chosen with ``seed`` (the evaluation protocol: 30k COCO-2014 val captions)."""
    annotations = _require_file(annotations, "COCO annotations file")
    image_dir = _require_file(image_dir, "COCO image folder")
    try:
        data = json.loads(annotations.read_text())
        files = {img["id"]: img["file_name"] for img in data["images"]}
        anns = [(a["image_id"], str(a["caption"]).strip()) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations'): {exc!r}") from None
    by_image: dict[int, list[str]] = {}
    for image_id, caption in anns:
        if image_id not in files:
            raise ValueError(f"{annotations}: caption for unknown image_id {image_id}.")
        by_image.setdefault(image_id, []).append(caption)
    rng = random.Random(seed)
    records = []
    for image_id in sorted(by_image):
        caps = by_image[image_id]
        chosen = [rng.choice(caps)] if one_per_image else caps
        records += [CaptionRecord(c, image_dir / files[image_id]) for c in chosen]
    return CaptionDataset(records, resolution)


def tsv_captions(path: str | Path, image_root: str | Path | None = None, resolution: int = 256,
                 caption_column: str = "caption", image_column: str = "image") -> CaptionDataset:
    """CC3M-style TSV with a header naming a caption and an image-path column (paths relative to
    ``image_root``, default: the TSV's folder)."""
    path = _require_file(path, "caption TSV")
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if reader.fieldnames is None or caption_column not in reader.fieldnames or image_column not in reader.fieldnames:
            raise ValueError(
                f"{path} must have a header with '{caption_column}' and '{image_column}' columns, "
                f"got {reader.fieldnames}. Pass caption_column= / image_column= to name yours."
            )
        records = [CaptionRecord(row[caption_column].strip(), root / row[image_column]) for row in reader]
    return CaptionDataset(records, resolution)


def folder_captions(folder: str | Path, resolution: int = 256) -> CaptionDataset:
    """A folder of ``name.jpg`` + ``name.txt`` pairs (images without a caption file are ignored)."""
    folder = _require_file(folder, "image folder")
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = image.with_suffix(".txt")
        if txt.is_file():
            records.append(CaptionRecord(txt.read_text(encoding="utf-8").strip(), image))
    if not records:
        raise ValueError(f"{folder} holds no image with a caption file beside it (name.jpg + name.txt).")
    return CaptionDataset(records, resolution)


def webdataset_captions(shards: Sequence[str | Path], resolution: int = 256) -> CaptionDataset:
    """WebDataset tar shards whose samples are ``key.{jpg,png,...}`` + ``key.txt``."""
    records = []
    for shard in shards:
        shard = _require_file(shard, "WebDataset shard")
        try:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name in sorted(members):
                    stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                    if f".{suffix.lower()}" in IMAGE_SUFFIXES and f"{stem}.txt" in members:
                        caption = tar.extractfile(members[f"{stem}.txt"]).read().decode("utf-8").strip()  # type: ignore[union-attr]
                        records.append(CaptionRecord(caption, name, shard))
        except tarfile.TarError as exc:
            raise ValueError(f"{shard} is not a readable tar shard: {exc}") from None
    return CaptionDataset(records, resolution)
