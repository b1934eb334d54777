"""The world's evaluator: a small CNN that reads the objects in each of the five slots of an image.

It is the world's analogue of the paper's metrics:

* **attribute accuracy** (analogue of CLIP score): `score_images(evaluator, images, scenes)` checks a
  generated image against the ground truth behind its caption, attribute by attribute (colour,
  shape, size, stated position, letter, relation, object count, whole scene right);
* its penultimate features `evaluator.embed(x)` are the embedding of the framework's `world_fd`
  (analogue of FID) and `world_mmd` (analogue of CMMD) metrics; the distances themselves are
  `aptp.metrics.frechet` and `aptp.metrics.mmd`, not redefined here.

Design (simple and honest): objects in the world always sit in one of five slots (left, right,
top, bottom, center), so the CNN has, per slot, a head for colour (none + 6), shape (none + 4 +
letter), size (2; trained only where a slot is occupied) and glyph (none + 7 letters). A single-
object is matched to the slot that best explains it (objects to distinct slots, by likelihood of
occupancy, colour, shape and stated size), so colour and shape are judged where the object is;
a stated position is right when the object was matched to that slot and the slot is occupied; a
relation is checked between the slot centres the objects were matched to. The evaluator is
trained with single objects placed up to 0.14 of the side off their slot centre, so an object
drawn between slots is read in the nearest one (`python -m aptp.world.tools.train_evaluator`).

    ev = load_evaluator()                        # shipped weights, aptp/assets/world/evaluator
    res = score_images(ev, images, scenes)       # one dict of booleans / None per image
    summary = attribute_accuracy(res)            # {"colour": 0.97, ..., "all": 0.9}
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from aptp.world.data import COLOURS, GLYPHS, LETTER, POSITION_CENTRES, POSITIONS, SHAPES, SIZES, Scene, relation_holds

__all__ = [
    "COLOUR_CLASSES",
    "SHAPE_CLASSES",
    "SIZE_CLASSES",
    "GLYPH_CLASSES",
    "DEFAULT_EVALUATOR_DIR",
    "Evaluator",
    "SlotPrediction",
    "scene_targets",
    "images_to_tensor",
    "load_evaluator",
    "score_images",
    "attribute_accuracy",
]

NONE = "none"
COLOUR_CLASSES: tuple[str, ...] = (NONE,) + tuple(COLOURS)
SHAPE_CLASSES: tuple[str, ...] = (NONE,) + SHAPES + (LETTER,)
SIZE_CLASSES: tuple[str, ...] = tuple(SIZES)
GLYPH_CLASSES: tuple[str, ...] = (NONE,) + GLYPHS
N_SLOTS = len(POSITIONS)
DEFAULT_EVALUATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "world" / "evaluator"


class Evaluator(nn.Module):
    """CNN: 32x32 RGB in [-1, 1] → 256-d features → per-slot logits for colour, shape, size, glyph.

    Args:
        image_size: input side in pixels (a multiple of 8).
        width: channels of the first stage (doubled twice).
        feature_dim: size of the penultimate features (the embedding of `world_fd` and `world_mmd`).
    """

    def __init__(self, image_size: int = 32, width: int = 32, feature_dim: int = 256) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size={image_size} must be a multiple of 8.")
        self.config = {"image_size": image_size, "width": width, "feature_dim": feature_dim}
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, w, 1), *block(w, w, 2),  # 16x16
            *block(w, 2 * w, 1), *block(2 * w, 2 * w, 2),  # 8x8
            *block(2 * w, 4 * w, 1), *block(4 * w, 4 * w, 2),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * (image_size // 8) ** 2, feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict(
            {
                "colour": nn.Linear(feature_dim, N_SLOTS * len(COLOUR_CLASSES)),
                "shape": nn.Linear(feature_dim, N_SLOTS * len(SHAPE_CLASSES)),
                "size": nn.Linear(feature_dim, N_SLOTS * len(SIZE_CLASSES)),
                "glyph": nn.Linear(feature_dim, N_SLOTS * len(GLYPH_CLASSES)),
            }
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, each (B, 5 slots, classes); slots in `POSITIONS` order."""
        f = self.features(x)
        return {k: h(f).view(x.shape[0], N_SLOTS, -1) for k, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[Image.Image], batch_size: int = 256) -> "SlotPrediction":
        """Per-slot class probabilities of images (tensor in [-1, 1] or PIL images)."""
        x = images_to_tensor(images)
        self.eval()
        outs = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        probs = {k: torch.cat([o[k] for o in outs]).softmax(-1) for k in self.heads}
        return SlotPrediction(**probs)

    @torch.no_grad()
    def embed(self, images: torch.Tensor | Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (tensor in [-1, 1] or PIL images)."""
        x = images_to_tensor(images)
        self.eval()
        return torch.cat([self.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


class SlotPrediction:
    """Probabilities per slot: colour (B, 5, 7), shape (B, 5, 6), size (B, 5, 2), glyph (B, 5, 8)."""

    def __init__(self, colour: torch.Tensor, shape: torch.Tensor, size: torch.Tensor, glyph: torch.Tensor) -> None:
        self.colour, self.shape, self.size, self.glyph = colour, shape, size, glyph

    @property
    def occupancy(self) -> torch.Tensor:
        """(B, 5) probability that a slot holds an object (mean of colour and shape 'not none')."""
        return 1.0 - 0.5 * (self.colour[..., 0] + self.shape[..., 0])


def images_to_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → (B, 3, H, W) float in [-1, 1]; a tensor is checked and passed through."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
        return images.float()
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def scene_targets(scene: Scene) -> dict[str, list[int]]:
    """Class index per slot for each head (size of an empty slot is -100 = ignored by the loss)."""
    colour, shape, size, glyph = [0] * N_SLOTS, [0] * N_SLOTS, [-100] * N_SLOTS, [0] * N_SLOTS
    for o in scene.objects:
        r = POSITIONS.index(o.position)
        colour[r] = COLOUR_CLASSES.index(o.colour)
        shape[r] = SHAPE_CLASSES.index(o.shape)
        size[r] = SIZE_CLASSES.index(o.size)
        glyph[r] = GLYPH_CLASSES.index(o.glyph) if o.glyph else 0
    return {"colour": colour, "shape": shape, "size": size, "glyph": glyph}


def load_evaluator(path: str | Path | None = None) -> Evaluator:
    """Load evaluator weights (`model.safetensors` + `config.json`; default: the shipped ones)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_EVALUATOR_DIR
    weights, cfg = path / "model.safetensors", path / "config.json"
    if not weights.is_file() or not cfg.is_file():
        raise FileNotFoundError(
            f"no evaluator at {path}: expected model.safetensors and config.json; "
            "train one with `python -m aptp.world.tools.train_evaluator --out DIR`."
        )
    config = json.loads(cfg.read_text())
    model = Evaluator(**{k: config[k] for k in ("image_size", "width", "feature_dim")})
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return model.eval()


def _score_one(p: SlotPrediction, b: int, scene: Scene) -> dict[str, bool | None]:
    """Attribute correctness of image b of the prediction against `scene`."""
    occ = p.occupancy[b].clamp(1e-6, 1.0)  # (5,)
    objs = scene.objects
    n = len(objs)
    eps = 1e-6

    def loglik(k: int, r: int) -> float:
        o = objs[k]
        s = math.log(occ[r]) + math.log(p.colour[b, r, COLOUR_CLASSES.index(o.colour)] + eps)
        s += math.log(p.shape[b, r, SHAPE_CLASSES.index(o.shape)] + eps)
        if o.size_stated:
            s += math.log(p.size[b, r, SIZE_CLASSES.index(o.size)] + eps)
        return s

    best, best_score = None, -math.inf
    for regions in itertools.permutations(range(N_SLOTS), n):  # objects go to distinct slots
        sc = sum(loglik(k, regions[k]) for k in range(n))
        if sc > best_score:
            best, best_score = regions, sc
    assert best is not None  # n <= 3 < 5 slots, so a permutation always exists

    res: dict[str, list[bool]] = {"colour": [], "shape": [], "size": [], "position": [], "glyph": [], "relation": []}
    for k, o in enumerate(objs):
        r = best[k]
        res["colour"].append(COLOUR_CLASSES[int(p.colour[b, r].argmax())] == o.colour)
        res["shape"].append(SHAPE_CLASSES[int(p.shape[b, r].argmax())] == o.shape)
        if o.size_stated:
            res["size"].append(SIZE_CLASSES[int(p.size[b, r].argmax())] == o.size)
        if o.position_stated:  # the object was found in its stated slot
            res["position"].append(POSITIONS[r] == o.position and bool(occ[r] > 0.5))
        if o.shape == LETTER:
            res["glyph"].append(GLYPH_CLASSES[int(p.glyph[b, r].argmax())] == o.glyph)
    for rel in scene.relations:
        a, c = POSITION_CENTRES[POSITIONS[best[rel.subject]]], POSITION_CENTRES[POSITIONS[best[rel.reference]]]
        res["relation"].append(relation_holds(rel.kind, a, c))
    out: dict[str, bool | None] = {k: (all(v) if v else None) for k, v in res.items()}
    out["count"] = int((p.occupancy[b] > 0.5).sum()) == n
    out["all"] = all(v for v in out.values() if v is not None)
    return out


def score_images(
    evaluator: Evaluator, images: torch.Tensor | Sequence[Image.Image], scenes: Sequence[Scene]
) -> list[dict[str, bool | None]]:
    """Check each image against the scene behind its caption.

    Returns one dict per image with keys colour, shape, size, position, glyph, relation, count, all:
    True/False when the caption states that attribute (for every object it applies to), None when
    it does not apply (e.g. size of "a red circle"). `count` = the number of occupied slots equals
    the number of objects; `all` = every applicable check holds.
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images but {len(scenes)} scenes; pass one scene per image.")
    p = evaluator.predict(images)
    return [_score_one(p, b, s) for b, s in enumerate(scenes)]


def attribute_accuracy(results: Sequence[dict[str, bool | None]]) -> dict[str, float | None]:
    """Mean of each attribute over the images where it applies (None where it never applies)."""
    keys = ("colour", "shape", "size", "position", "glyph", "relation", "count", "all")
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in results if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out
