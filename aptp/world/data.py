"""The embedded default world: seeded, procedurally drawn captioned images of graded difficulty.

Every image is a handful of coloured shapes (or letters) on a black background, placed in one of
five fixed slots (left, right, top, bottom, center). The caption is generated from a `Scene`, the
ground truth behind it, so any generated image can be checked against its prompt attribute by
attribute (see `aptp.world.evaluator`). Difficulty grows with the number of objects, spatial
relations and rendered text, which is the gradient prompt routing is meant to exploit:

    grade 1  "a red circle", "a large red circle at the top"
    grade 2  "a small blue square on the left and a large yellow triangle on the right"
    grade 3  "a small blue square left of a large yellow triangle"
    grade 3  'the letter "A" in red'
    grade 4  "a small blue square left of a large yellow triangle and a green circle at the top"

    grade = number of objects + number of relations + 2 x number of letters

Only Pillow is needed to draw. Sample `i` of seed `s` is drawn from its own
`random.Random(f"aptp-world:{s}:{i}")`, so the same (seed, index) always gives the same image,
caption and scene, whatever else was sampled before.

    >>> world = World(WorldConfig())
    >>> s = world.sample(2, seed=0)[0]
    >>> s.caption, s.image.size  # doctest: +SKIP
    ('a large red circle at the top', (32, 32))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "POSITION_CENTRES",
    "POSITION_PHRASES",
    "RELATIONS",
    "GLYPHS",
    "TEXT_GLYPHS",
    "CONFUSABLE_GLYPHS",
    "GRADED_KINDS",
    "KINDS",
    "EVERY_KIND_MIX",
    "WorldObject",
    "Relation",
    "Scene",
    "Sample",
    "WorldConfig",
    "World",
    "WorldDataset",
    "relation_holds",
    "single_object_scene",
    "image_grid",
]

# ---------------------------------------------------------------------------------------------
# Vocabulary: small on purpose, so a 4 M-parameter model can learn it on a CPU in an hour.
# ---------------------------------------------------------------------------------------------
#: Colour name -> RGB. Chosen far apart in RGB so nearest-palette classification is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (165, 55, 210),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Size name -> object radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.095, "large": 0.16}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
#: Slot centre (x, y) as fractions of the image side (y grows downwards).
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.1875, 0.5),
    "right": (0.8125, 0.5),
    "top": (0.5, 0.1875),
    "bottom": (0.5, 0.8125),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
#: Relation name -> caption phrase. "A left of B" means A's centre is left of B's centre.
RELATIONS: dict[str, str] = {
    "left_of": "left of",
    "right_of": "right of",
    "above": "above",
    "below": "below",
}
#: Letters of the original `text` kind (no "O": it would read as a circle).
TEXT_GLYPHS: tuple[str, ...] = ("A", "B", "E", "H", "K", "T", "X")
#: Letters of the capacity-graded `glyph` kind: 12 capitals that differ by one or two strokes
#: (E/F/L, P/R/B, H/N, K/X/Y, T/L), drawn large enough that those strokes are resolved at 32 px.
CONFUSABLE_GLYPHS: tuple[str, ...] = ("B", "E", "F", "H", "K", "L", "N", "P", "R", "T", "X", "Y")
#: Every letter the world draws (the evaluator's glyph classes).
GLYPHS: tuple[str, ...] = tuple(sorted(set(TEXT_GLYPHS) | set(CONFUSABLE_GLYPHS)))
#: Radius (fraction of the side) of a `glyph`-kind letter: strokes of about 2 px at 32 px.
GLYPH_RADIUS = 0.3
#: The shape name of an object that is a rendered letter.
LETTER = "letter"
BACKGROUND = (0, 0, 0)

#: The capacity-graded kinds and their difficulty (larger = harder): what the default mix draws.
#: `plain` "a red circle" (one large shape in the center: colour and shape), `placed` "a small red
#: circle on the left" (size and slot too: finer spatial control), `glyph` 'the letter "E" in red'
#: (one of 12 confusable capitals, large: strokes must be drawn right, which needs capacity).
GRADED_KINDS: dict[str, int] = {"plain": 1, "placed": 2, "glyph": 3}
#: Every scene kind and the number of objects it needs.
KINDS: dict[str, int] = {"plain": 1, "placed": 1, "glyph": 1,
                         "single": 1, "pair_position": 2, "pair_relation": 2, "triple": 3, "text": 1}
#: A mix with every kind in equal shares (evaluator training and validation, tests).
EVERY_KIND_MIX: tuple[tuple[str, float], ...] = tuple((k, 1.0) for k in KINDS)

# Pairs of slots for which a relation reads unambiguously (same row or same column).
_RELATION_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "left_of": (("left", "center"), ("left", "right"), ("center", "right")),
    "right_of": (("center", "left"), ("right", "left"), ("right", "center")),
    "above": (("top", "center"), ("top", "bottom"), ("center", "bottom")),
    "below": (("center", "top"), ("bottom", "top"), ("bottom", "center")),
}


@dataclass(frozen=True)
class WorldObject:
    """One drawn object and which of its attributes the caption states.

    Attributes:
        shape: one of `SHAPES`, or `"letter"` for a rendered glyph.
        colour: a key of `COLOURS`.
        size: a key of `SIZES`.
        position: the slot, one of `POSITIONS`.
        glyph: the letter drawn when `shape == "letter"`, else None.
        center: the drawn centre (x, y) as fractions of the image side (slot centre + jitter).
        radius: the drawn radius as a fraction of the image side.
        size_stated / position_stated: whether the caption names the size / the absolute slot.
            Colour, shape and glyph are always stated.
    """

    shape: str
    colour: str
    size: str
    position: str
    glyph: str | None = None
    center: tuple[float, float] = (0.5, 0.5)
    radius: float = 0.16
    size_stated: bool = True
    position_stated: bool = True

    def bbox(self, image_size: int) -> tuple[int, int, int, int]:
        """Pixel bounding box (x0, y0, x1, y1), x1/y1 exclusive, clipped to the image."""
        cx, cy, r = self.center[0] * image_size, self.center[1] * image_size, self.radius * image_size
        x0, y0 = max(0, int(cx - r - 1)), max(0, int(cy - r - 1))
        x1, y1 = min(image_size, int(cx + r + 2)), min(image_size, int(cy + r + 2))
        return x0, y0, x1, y1

    def phrase(self) -> str:
        """Noun phrase without article, e.g. "small red circle" or 'letter "A" in red'."""
        if self.shape == LETTER:
            return f'letter "{self.glyph}" in {self.colour}'
        words = ([self.size] if self.size_stated else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` is `kind` (a key of `RELATIONS`) `objects[reference]`."""

    subject: int
    kind: str
    reference: int


@dataclass(frozen=True)
class Scene:
    """Ground truth behind a caption: the objects, the stated relations, the grade and the kind."""

    objects: tuple[WorldObject, ...]
    relations: tuple[Relation, ...] = ()
    kind: str = "single"

    @property
    def difficulty(self) -> int:
        """The graded kinds' grade (`GRADED_KINDS`: plain 1, placed 2, glyph 3); for the other kinds
        objects + relations + 2 x letters (1 for "a red circle", 4 for a related pair + one)."""
        if self.kind in GRADED_KINDS:
            return GRADED_KINDS[self.kind]
        n_letters = sum(o.shape == LETTER for o in self.objects)
        return len(self.objects) + len(self.relations) + 2 * n_letters

    def caption(self) -> str:
        """The caption this scene stands for (deterministic function of the scene)."""
        return _caption(self)


@dataclass(frozen=True)
class Sample:
    """A rendered image, its caption, the scene behind it and the scene's difficulty grade."""

    image: Image.Image
    caption: str
    scene: Scene
    difficulty: int


@dataclass(frozen=True)
class WorldConfig:
    """How the world is drawn and what mix of prompts it produces.

    Attributes:
        image_size: side of the square RGB images, in pixels (>= 16).
        supersample: render at `image_size * supersample`, then box-downsample (antialiasing).
        colours / shapes / glyphs: the vocabulary used (subsets of `COLOURS`, `SHAPES`, `GLYPHS`);
            `glyphs` are the `text` kind's letters, `graded_glyphs` the `glyph` kind's.
        max_objects: 1, 2 or 3; kinds needing more objects are dropped from the mix.
        allow_text: whether letter prompts ('the letter "A" in red') are drawn.
        mix: relative weight of each scene kind. The default: the capacity-graded kinds
            (`GRADED_KINDS`: `plain`, `placed`, `glyph`) in equal shares. Also available: `single`
            (one shape, some attributes unstated), `pair_position` (two shapes, absolute slots),
            `pair_relation` (two shapes and a relation), `triple` (a related pair plus a third
            shape at a stated slot), `text` (a small letter, sometimes with a slot).
        partial_prob: chance that a single object's caption leaves out its size and/or slot.
        jitter: maximal offset of an object's centre from its slot centre, fraction of the side.
        colour_jitter: maximal per-channel offset added to an object's RGB colour.
    """

    image_size: int = 32
    supersample: int = 4
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    glyphs: tuple[str, ...] = TEXT_GLYPHS
    graded_glyphs: tuple[str, ...] = CONFUSABLE_GLYPHS
    max_objects: int = 3
    allow_text: bool = True
    mix: tuple[tuple[str, float], ...] = (("plain", 1.0), ("placed", 1.0), ("glyph", 1.0))
    partial_prob: float = 0.25
    jitter: float = 0.04
    colour_jitter: int = 12

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size} is too small to draw shapes: use >= 16.")
        if self.supersample < 1:
            raise ValueError(f"supersample={self.supersample} must be >= 1 (1 = no antialiasing).")
        for name, allowed, vocab in (
            ("colours", self.colours, COLOURS),
            ("shapes", self.shapes, SHAPES),
            ("glyphs", self.glyphs, GLYPHS),
            ("graded_glyphs", self.graded_glyphs, GLYPHS),
        ):
            unknown = [v for v in allowed if v not in vocab]
            if unknown or not allowed:
                raise ValueError(f"{name}={allowed!r}: unknown {unknown!r} or empty; choose from {tuple(vocab)!r}.")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects={self.max_objects} must be 1, 2 or 3.")
        bad = [k for k, _ in self.mix if k not in KINDS]
        if bad:
            raise ValueError(f"mix has unknown kinds {bad!r}; known: {sorted(KINDS)}.")
        if any(not w >= 0 for _, w in self.mix):  # also refuses NaN
            raise ValueError(f"mix={self.mix!r}: weights must be >= 0.")
        if not any(w > 0 for k, w in self.kind_weights()):
            raise ValueError(f"mix={self.mix!r} leaves no kind with positive weight under max_objects/allow_text.")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("need at least 2 colours and 2 shapes to draw multi-object scenes.")

    def kind_weights(self) -> list[tuple[str, float]]:
        """The mix after dropping kinds that `max_objects` / `allow_text` forbid."""
        return [
            (k, float(w))
            for k, w in self.mix
            if KINDS[k] <= self.max_objects and (k not in ("text", "glyph") or self.allow_text) and w > 0
        ]


def relation_holds(kind: str, subject_xy: tuple[float, float], reference_xy: tuple[float, float], margin: float = 0.15) -> bool:
    """Whether `subject` is `kind` of `reference`, from centres given as fractions of the side."""
    dx, dy = subject_xy[0] - reference_xy[0], subject_xy[1] - reference_xy[1]
    if kind == "left_of":
        return dx < -margin
    if kind == "right_of":
        return dx > margin
    if kind == "above":
        return dy < -margin
    if kind == "below":
        return dy > margin
    raise ValueError(f"unknown relation {kind!r}; known: {list(RELATIONS)}.")


def _caption(scene: Scene) -> str:
    objs = scene.objects

    def np_(i: int) -> str:
        o = objs[i]
        if o.shape == LETTER:
            return "the " + o.phrase()
        return "a " + o.phrase()

    def with_pos(i: int) -> str:
        o = objs[i]
        return np_(i) + (" " + POSITION_PHRASES[o.position] if o.position_stated else "")

    if scene.relations:
        r = scene.relations[0]
        text = f"{np_(r.subject)} {RELATIONS[r.kind]} {np_(r.reference)}"
        rest = [i for i in range(len(objs)) if i not in (r.subject, r.reference)]
        for i in rest:
            text += " and " + with_pos(i)
        return text
    return " and ".join(with_pos(i) for i in range(len(objs)))


class World:
    """Draws seeded samples from a `WorldConfig`. Cheap to build; holds no state but the config."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()

    # -- scenes --------------------------------------------------------------------------------
    def _object(
        self,
        rng: random.Random,
        position: str,
        *,
        shape: str | None = None,
        colour: str | None = None,
        size: str | None = None,
        size_stated: bool = True,
        position_stated: bool = True,
    ) -> WorldObject:
        c = self.config
        shape = shape or rng.choice(c.shapes)
        colour = colour or rng.choice(c.colours)
        glyph = rng.choice(c.glyphs) if shape == LETTER else None
        size = size or rng.choice(tuple(SIZES))
        if shape == LETTER:
            size = "large"
        px, py = POSITION_CENTRES[position]
        j = c.jitter
        center = (px + rng.uniform(-j, j), py + rng.uniform(-j, j))
        radius = SIZES[size] * rng.uniform(0.94, 1.06)
        return WorldObject(
            shape=shape,
            colour=colour,
            size=size,
            position=position,
            glyph=glyph,
            center=center,
            radius=radius,
            size_stated=size_stated and shape != LETTER,
            position_stated=position_stated,
        )

    def _distinct(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        """n (shape, colour) pairs, pairwise different in at least one attribute."""
        out: list[tuple[str, str]] = []
        while len(out) < n:
            cand = (rng.choice(self.config.shapes), rng.choice(self.config.colours))
            if cand not in out:
                out.append(cand)
        return out

    def scene(self, rng: random.Random, kind: str | None = None) -> Scene:
        """Draw one scene of `kind` (or of a kind drawn from the mix) with `rng`."""
        c = self.config
        if kind is None:
            kinds, weights = zip(*c.kind_weights())
            kind = rng.choices(kinds, weights=weights)[0]
        if kind == "plain":  # one large shape in the center; the caption states colour and shape
            obj = self._object(rng, "center", size="large", size_stated=False, position_stated=False)
            return Scene((obj,), (), kind)
        if kind == "placed":  # one shape; the caption states size and slot too
            return Scene((self._object(rng, rng.choice(POSITIONS)),), (), kind)
        if kind == "glyph":  # one of the confusable capitals, large, in the center
            obj = self._object(rng, "center", shape=LETTER, position_stated=False)
            obj = replace(obj, glyph=rng.choice(c.graded_glyphs), radius=GLYPH_RADIUS * rng.uniform(0.96, 1.04))
            return Scene((obj,), (), kind)
        if kind == "single":
            size_stated, pos_stated = True, True
            if rng.random() < c.partial_prob:  # leave out the size, the slot, or both
                size_stated, pos_stated = rng.choice(((False, True), (True, False), (False, False)))
            obj = self._object(rng, rng.choice(POSITIONS), size_stated=size_stated, position_stated=pos_stated)
            return Scene((obj,), (), kind)
        if kind == "text":
            pos_stated = rng.random() < 0.5
            pos = rng.choice(POSITIONS) if pos_stated else "center"
            obj = self._object(rng, pos, shape=LETTER, position_stated=pos_stated)
            return Scene((obj,), (), kind)
        if kind == "pair_position":
            (s0, c0), (s1, c1) = self._distinct(rng, 2)
            p0, p1 = rng.sample(POSITIONS, 2)
            objs = (self._object(rng, p0, shape=s0, colour=c0), self._object(rng, p1, shape=s1, colour=c1))
            return Scene(objs, (), kind)
        if kind in ("pair_relation", "triple"):
            rel = rng.choice(tuple(RELATIONS))
            p0, p1 = rng.choice(_RELATION_PAIRS[rel])
            n = 2 if kind == "pair_relation" else 3
            attrs = self._distinct(rng, n)
            objs = [
                self._object(rng, p0, shape=attrs[0][0], colour=attrs[0][1], position_stated=False),
                self._object(rng, p1, shape=attrs[1][0], colour=attrs[1][1], position_stated=False),
            ]
            if n == 3:
                free = [p for p in POSITIONS if p not in (p0, p1)]
                objs.append(self._object(rng, rng.choice(free), shape=attrs[2][0], colour=attrs[2][1]))
            return Scene(tuple(objs), (Relation(0, rel, 1),), kind)
        raise ValueError(f"unknown scene kind {kind!r}; known: {', '.join(KINDS)}.")

    # -- rendering -----------------------------------------------------------------------------
    def render(self, scene: Scene, rng: random.Random | None = None) -> Image.Image:
        """Draw `scene` as an RGB image of `config.image_size` (colours jittered with `rng`)."""
        c = self.config
        big = c.image_size * c.supersample
        img = Image.new("RGB", (big, big), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for obj in scene.objects:
            rgb = COLOURS[obj.colour]
            if rng is not None and c.colour_jitter:
                rgb = tuple(min(255, max(0, v + rng.randint(-c.colour_jitter, c.colour_jitter))) for v in rgb)
            _draw_object(draw, obj, big, rgb)
        if c.supersample > 1:
            img = img.reduce(c.supersample)  # box filter: antialiased edges, pure colours inside
        return img

    def sample_one(self, seed: int, index: int, kind: str | None = None) -> Sample:
        """Sample `index` of `seed`: independent of any other index."""
        rng = random.Random(f"aptp-world:{seed}:{index}")
        scene = self.scene(rng, kind)
        image = self.render(scene, rng)
        return Sample(image=image, caption=scene.caption(), scene=scene, difficulty=scene.difficulty)

    def sample(self, n: int, seed: int = 0, kind: str | None = None) -> list[Sample]:
        """n samples of `seed` (indices 0..n-1); `kind` forces one scene kind for all of them."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0.")
        return [self.sample_one(seed, i, kind) for i in range(n)]


def single_object_scene(shape: str, colour: str, size: str, position: str) -> Scene:
    """A fully stated one-object scene at its slot centre (for building evaluation prompts)."""
    if shape not in SHAPES or colour not in COLOURS or size not in SIZES or position not in POSITIONS:
        raise ValueError(
            f"single_object_scene({shape!r}, {colour!r}, {size!r}, {position!r}): choose shape from {SHAPES}, "
            f"colour from {tuple(COLOURS)}, size from {tuple(SIZES)}, position from {POSITIONS}."
        )
    obj = WorldObject(shape, colour, size, position, None, POSITION_CENTRES[position], SIZES[size])
    return Scene((obj,), (), "single")


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _draw_object(draw: ImageDraw.ImageDraw, obj: WorldObject, side: int, rgb: tuple[int, ...]) -> None:
    cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
    fill = tuple(rgb)
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = r * 0.88
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - 1.05 * r), (cx - 1.05 * r, cy + 0.8 * r), (cx + 1.05 * r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif obj.shape == LETTER:
        if obj.glyph is None:
            raise ValueError("a letter object needs a glyph; got glyph=None.")
        font = _font(max(8, int(round(2.4 * r))))
        draw.text((cx, cy), obj.glyph, fill=fill, font=font, anchor="mm", stroke_width=max(1, int(r * 0.12)), stroke_fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES + (LETTER,)}.")


class WorldDataset:
    """A map-style torch Dataset over `World.sample_one(seed, i)` for i in range(length).

    Items are dicts: `pixel_values` float tensor (3, H, W) in [-1, 1], `caption` str,
    `difficulty` int, `index` int. Scenes are not collated (use `world.sample_one(seed, i).scene`).
    """

    def __init__(self, world: World | None = None, length: int = 100_000, seed: int = 0, kind: str | None = None) -> None:
        if length <= 0:
            raise ValueError(f"length={length} must be > 0.")
        self.world = world or World()
        self.length, self.seed, self.kind = length, seed, kind

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        import numpy as np
        import torch

        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a WorldDataset of length {self.length}.")
        s = self.world.sample_one(self.seed, i, self.kind)
        arr = np.asarray(s.image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        return {
            "pixel_values": torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
            "caption": s.caption,
            "difficulty": s.difficulty,
            "index": i,
        }


def image_grid(images: Sequence[Image.Image], cols: int = 8, scale: int = 1) -> Image.Image:
    """Paste equally sized images into a grid (row-major), optionally upscaled (nearest)."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w * scale, rows * h * scale), (64, 64, 64))
    for k, im in enumerate(images):
        im = im.convert("RGB")
        if scale != 1:
            im = im.resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(im, ((k % cols) * w * scale, (k // cols) * h * scale))
    return grid
