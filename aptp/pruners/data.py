"""Training data of the pruning procedures: image-caption pairs from the embedded world or from
local captioned images (COCO, TSV, a folder, a WebDataset shard)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DATA_SOURCES = ("world", "coco", "tsv", "folder", "webdataset")


@dataclass
class DataConfig:
    """Where training images and captions come from."""

    source: str = "world"  # world (the embedded default) | coco | tsv | folder | webdataset
    path: Optional[str] = None  # coco: annotations JSON; tsv: the TSV; folder: the folder; webdataset: a shard
    image_dir: Optional[str] = None  # coco: the image folder; tsv: root of relative image paths
    num_samples: int = 2048  # world: how many samples to draw; others: at most this many (0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {', '.join(DATA_SOURCES)}.")
        if self.source != "world" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (a local file or folder).")
        if self.num_samples < 0:
            raise ValueError(f"data.num_samples={self.num_samples} must be >= 0.")


def load_dataset(cfg: DataConfig, resolution: int):
    """A map-style dataset of ``{"image": (3, R, R) in [-1, 1], "caption": str}``."""
    from aptp.data import captions as C

    if cfg.source == "world":
        from aptp.world.data import World, WorldConfig, WorldDataset

        world = World(WorldConfig(image_size=resolution))
        return _Renamed(WorldDataset(world, length=cfg.num_samples or 2048, seed=cfg.seed))
    if cfg.source == "coco":
        ds = C.coco_captions(cfg.path, cfg.image_dir or Path(cfg.path).parent, resolution)
    elif cfg.source == "tsv":
        ds = C.tsv_captions(cfg.path, cfg.image_dir, resolution)
    elif cfg.source == "folder":
        ds = C.folder_captions(cfg.path, resolution)
    else:
        ds = C.webdataset_captions([cfg.path], resolution)
    if cfg.num_samples and len(ds) > cfg.num_samples:
        ds.records = ds.records[: cfg.num_samples]
    return ds


class _Renamed:
    """World items (``pixel_values``) under the caption datasets' keys (``image``)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.ds[i]
        return {"image": item["pixel_values"], "caption": item["caption"]}

    @property
    def captions(self) -> list[str]:
        return [self.ds.world.sample_one(self.ds.seed, i, self.ds.kind).caption for i in range(len(self.ds))]
