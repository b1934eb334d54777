"""``world_accuracy``: attribute accuracy of generated images of the embedded world (the world's
analogue of CLIP score), higher is better.

Each prompt is parsed back into the :class:`~aptp.world.data.Scene` it states
(:func:`parse_world_caption`, the inverse of the world's caption grammar), each image is read by
the world's attribute evaluator (:func:`aptp.world.evaluator.score_images`) and checked against
that scene; the metric is the fraction of images where ``attribute`` is right (default ``"all"``:
the whole scene). :meth:`WorldAccuracy.accuracies` gives every attribute at once. Evaluator
weights: ``evaluator`` (a folder with ``model.safetensors`` + ``config.json``), default the ones
shipped in the package; loaded on first use.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from aptp.metrics import _world
from aptp.metrics._common import check_images, check_prompts

ATTRIBUTES = ("colour", "shape", "size", "position", "glyph", "relation", "count", "all")


# ------------------------------------------------------------------------------- caption parsing
@functools.lru_cache(maxsize=1)
def _grammar() -> dict[str, Any]:
    from aptp.world.data import COLOURS, GLYPHS, POSITION_PHRASES, RELATIONS, SHAPES, SIZES

    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    shape_np = rf"a (?:(?P<size>{alt(SIZES)}) )?(?P<colour>{alt(COLOURS)}) (?P<shape>{alt(SHAPES)})"
    letter_np = rf"the letter \"(?P<glyph>{alt(GLYPHS)})\" in (?P<lcolour>{alt(COLOURS)})"
    np_ = rf"(?:{shape_np}|{letter_np})"
    return {
        "np": re.compile(rf"^{np_}$"),
        "with_pos": re.compile(rf"^(?P<np>.+?)(?: (?P<pos>{alt(POSITION_PHRASES.values())}))?$"),
        "relation": re.compile(rf"^(?P<a>.+?) (?P<rel>{alt(RELATIONS.values())}) (?P<b>.+)$"),
        "positions": {v: k for k, v in POSITION_PHRASES.items()},
        "relations": {v: k for k, v in RELATIONS.items()},
    }


def _object(phrase: str, position: str | None, caption: str) -> Any:
    from aptp.world.data import LETTER, POSITION_CENTRES, SIZES, WorldObject

    m = _grammar()["np"].match(phrase)
    if m is None:
        raise ValueError(f"cannot read {phrase!r} in the world caption {caption!r} as an object.")
    slot = position or "center"
    if m.group("glyph"):
        return WorldObject(LETTER, m.group("lcolour"), "large", slot, m.group("glyph"), POSITION_CENTRES[slot],
                           SIZES["large"], size_stated=False, position_stated=position is not None)
    size = m.group("size")
    return WorldObject(m.group("shape"), m.group("colour"), size or "large", slot, None, POSITION_CENTRES[slot],
                       SIZES[size or "large"], size_stated=size is not None, position_stated=position is not None)


def _with_position(part: str, caption: str) -> tuple[str, str | None]:
    g = _grammar()
    m = g["with_pos"].match(part)
    assert m is not None  # the pattern accepts any non-empty string
    pos = m.group("pos")
    return m.group("np"), (g["positions"][pos] if pos else None)


def parse_world_caption(caption: str) -> Any:
    """The :class:`~aptp.world.data.Scene` a world caption states (what the evaluator checks):
    shapes, colours, stated sizes and slots, letters, the relation. Unstated slots are filled with
    free ones (they are never checked). A one-object caption gets the kind of the default graded world
    that reads so (``plain``, ``placed``, ``glyph``; else ``single`` / ``text``). Raises ValueError on a
    caption outside the world grammar."""
    from aptp.world.data import LETTER, POSITION_CENTRES, POSITIONS, Relation, Scene

    g = _grammar()
    parts = caption.strip().split(" and ")
    relation = None
    first = g["relation"].match(parts[0])
    if first is not None and g["np"].match(first.group("a")) and g["np"].match(first.group("b")):
        relation = g["relations"][first.group("rel")]
        objects = [_object(first.group("a"), None, caption), _object(first.group("b"), None, caption)]
        rest = parts[1:]
    else:
        objects, rest = [], parts
    for part in rest:
        phrase, pos = _with_position(part, caption)
        objects.append(_object(phrase, pos, caption))
    stated = [o.position for o in objects if o.position_stated]
    if len(set(stated)) != len(stated):
        raise ValueError(f"the world caption {caption!r} puts two objects in the same slot.")
    free = iter(p for p in POSITIONS if p not in stated)
    for i, o in enumerate(objects):  # give unstated objects distinct, otherwise unused slots
        if not o.position_stated:
            slot = next(free)
            objects[i] = type(o)(o.shape, o.colour, o.size, slot, o.glyph, POSITION_CENTRES[slot], o.radius,
                                 o.size_stated, False)
    if relation is not None:
        kind = "pair_relation" if len(objects) == 2 else "triple"
        return Scene(tuple(objects), (Relation(0, relation, 1),), kind)
    if len(objects) == 1:  # one object: the default (graded) world's kind where the caption fits one
        o = objects[0]
        if o.shape == LETTER:
            kind = "text" if o.position_stated else "glyph"
        else:
            kind = {(False, False): "plain", (True, True): "placed"}.get((o.size_stated, o.position_stated), "single")
        return Scene(tuple(objects), (), kind)
    return Scene(tuple(objects), (), "pair_position")


# ------------------------------------------------------------------------------------ the metric
@dataclass
class WorldAccuracyConfig:
    """Parameters of ``world_accuracy``."""

    evaluator: Optional[str] = None  # evaluator folder; None: the weights shipped in the package
    attribute: str = "all"  # which accuracy compute() returns (accuracies() gives all)
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.attribute not in ATTRIBUTES:
            raise ValueError(f"world_accuracy: attribute must be one of {ATTRIBUTES}, got {self.attribute!r}.")
        if self.batch_size < 1:
            raise ValueError(f"world_accuracy: batch_size must be >= 1, got {self.batch_size}.")


class WorldAccuracy(_world.EvaluatorMetric):
    """Attribute accuracy of world images against the scenes their prompts state (world evaluator)."""

    config_class = WorldAccuracyConfig
    name: ClassVar[str] = "world_accuracy"
    higher_is_better: ClassVar[bool] = True

    def results(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, bool | None]]:
        """Per image: each attribute True / False, or None where the prompt does not state it."""
        from aptp.world.evaluator import score_images

        images = check_images(images)
        scenes = [parse_world_caption(p) for p in check_prompts(prompts, images.shape[0])]
        evaluator = self.load()
        x = _world.to_evaluator_input(evaluator, images)  # (N, 3, S, S) in [-1, 1]
        out: list[dict[str, bool | None]] = []
        for start in range(0, len(scenes), self.config.batch_size):
            stop = start + self.config.batch_size
            out += score_images(evaluator, x[start:stop], scenes[start:stop])
        return out

    def accuracies(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float | None]:
        """Every attribute's accuracy over the images whose prompt states it (None: never stated)."""
        from aptp.world.evaluator import attribute_accuracy

        return attribute_accuracy(self.results(images, prompts))

    def per_sample(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """1.0 / 0.0 per image: ``attribute`` right or not (NaN where the prompt does not state it)."""
        key = self.config.attribute
        return [math.nan if r[key] is None else float(r[key]) for r in self.results(images, prompts)]

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """Accuracy of ``attribute`` (NaN when no prompt states it); ``reference`` is not used."""
        value = self.accuracies(images, prompts)[self.config.attribute]
        return math.nan if value is None else float(value)
