"""The world generator: deterministic per seed, and its ground truth matches the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aptp.world.data import (
    COLOURS,
    CONFUSABLE_GLYPHS,
    EVERY_KIND_MIX,
    GRADED_KINDS,
    KINDS,
    LETTER,
    POSITION_CENTRES,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    World,
    WorldConfig,
    WorldDataset,
    relation_holds,
    single_object_scene,
)

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (6, 3)
NAMES = list(COLOURS)


def _object_pixels(img: np.ndarray, obj, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright pixels inside the object's box: (ys, xs) and their nearest palette colour names."""
    x0, y0, x1, y1 = obj.bbox(size)
    crop = img[y0:y1, x0:x1].astype(np.float32)
    bright = crop.max(-1) > 120
    ys, xs = np.nonzero(bright)
    d = ((crop[ys, xs][:, None, :] - PALETTE[None]) ** 2).sum(-1)
    return np.stack([ys + y0, xs + x0], 1), np.array(NAMES)[d.argmin(1)]


def _nearest_slot(x: float, y: float) -> str:
    return min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] - x) ** 2 + (POSITION_CENTRES[p][1] - y) ** 2)


def test_same_seed_same_samples_and_other_seed_differs() -> None:
    w = World()
    a, b, c = w.sample(24, seed=5), w.sample(24, seed=5), w.sample(24, seed=6)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.scene for s in a] == [s.scene for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in a] != [s.caption for s in c]
    # a sample depends on (seed, index) only, not on what was sampled before
    assert w.sample_one(5, 7).caption == a[7].caption


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 10_000))
def test_sample_one_is_a_function_of_seed_and_index(seed: int, index: int) -> None:
    w = World()
    x, y = w.sample_one(seed, index), w.sample_one(seed, index)
    assert x.caption == y.caption and x.scene == y.scene == y.scene
    assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert x.difficulty == x.scene.difficulty >= 1


def test_ground_truth_matches_pixels() -> None:
    """Dominant colour in each object's box is its colour; its centroid lies in its stated slot."""
    size = 32
    w = World(WorldConfig(image_size=size, mix=EVERY_KIND_MIX))
    samples = w.sample(300, seed=11)
    checked = 0
    for s in samples:
        img = np.asarray(s.image)
        assert img.shape == (size, size, 3)
        for obj in s.scene.objects:
            yx, names = _object_pixels(img, obj, size)
            assert len(names) >= 6, f"{s.caption}: object {obj} drew only {len(names)} bright pixels"
            values, counts = np.unique(names, return_counts=True)
            assert values[counts.argmax()] == obj.colour, f"{s.caption}: dominant colour {values[counts.argmax()]}"
            own = yx[names == obj.colour]
            cy, cx = (own.mean(0) + 0.5) / size
            assert _nearest_slot(cx, cy) == obj.position, f"{s.caption}: centroid ({cx:.2f}, {cy:.2f}) not {obj.position}"
            checked += 1
    assert checked > 400  # multi-object scenes are in the mix


def test_sizes_are_ordered_per_shape() -> None:
    w = World()
    area: dict[tuple[str, str], list[int]] = {}
    for s in w.sample(400, seed=3, kind="single"):
        (obj,) = s.scene.objects
        _, names = _object_pixels(np.asarray(s.image), obj, 32)
        area.setdefault((obj.shape, obj.size), []).append(int((names == obj.colour).sum()))
    for shape in SHAPES:
        small, large = area[(shape, "small")], area[(shape, "large")]
        assert max(small) < min(large), f"{shape}: small areas up to {max(small)}, large from {min(large)}"


def test_captions_state_the_ground_truth() -> None:
    w = World(WorldConfig(mix=EVERY_KIND_MIX))
    kinds = set()
    for s in w.sample(300, seed=4):
        kinds.add(s.scene.kind)
        for o in s.scene.objects:
            assert o.colour in s.caption
            if o.shape == LETTER:
                assert f'letter "{o.glyph}"' in s.caption
            else:
                assert o.shape in s.caption
            if o.position_stated:
                assert POSITION_PHRASES[o.position] in s.caption
        for r in s.scene.relations:
            assert RELATIONS[r.kind] in s.caption
            a, b = s.scene.objects[r.subject], s.scene.objects[r.reference]
            assert relation_holds(r.kind, a.center, b.center), s.caption
        positions = [o.position for o in s.scene.objects]
        assert len(set(positions)) == len(positions)  # one object per slot
    assert kinds == set(KINDS)


def test_difficulty_grades() -> None:
    w = World()
    assert {s.difficulty for s in w.sample(20, 0, kind="single")} == {1}
    assert {s.difficulty for s in w.sample(20, 0, kind="pair_relation")} == {3}
    assert {s.difficulty for s in w.sample(20, 0, kind="triple")} == {4}
    assert {s.difficulty for s in w.sample(20, 0, kind="text")} == {3}
    assert single_object_scene("circle", "red", "large", "top").caption() == "a large red circle at the top"
    assert {s.difficulty for s in w.sample(20, 0, kind="plain")} == {1}
    assert {s.difficulty for s in w.sample(20, 0, kind="placed")} == {2}
    assert {s.difficulty for s in w.sample(20, 0, kind="glyph")} == {3}


def test_default_mix_is_the_graded_kinds_in_equal_shares() -> None:
    from collections import Counter

    counts = Counter(s.scene.kind for s in World().sample(900, seed=8))
    assert set(counts) == set(GRADED_KINDS)
    assert all(240 <= c <= 360 for c in counts.values()), counts  # 300 expected each
    only = World(WorldConfig(mix=(("glyph", 1.0),))).sample(30, seed=8)
    assert {s.scene.kind for s in only} == {"glyph"}
    with pytest.raises(ValueError, match="weights must be >= 0"):
        WorldConfig(mix=(("plain", -1.0), ("glyph", 1.0)))


def test_graded_kinds_state_what_they_draw() -> None:
    w = World()
    for s in w.sample(20, 1, kind="plain"):
        (o,) = s.scene.objects
        assert s.caption == f"a {o.colour} {o.shape}" and o.size == "large" and o.position == "center"
    for s in w.sample(20, 1, kind="placed"):
        (o,) = s.scene.objects
        assert s.caption == f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}"
    glyphs = set()
    for s in w.sample(200, 1, kind="glyph"):
        (o,) = s.scene.objects
        assert s.caption == f'the letter "{o.glyph}" in {o.colour}' and o.glyph in CONFUSABLE_GLYPHS
        glyphs.add(o.glyph)
    assert glyphs == set(CONFUSABLE_GLYPHS) and len(CONFUSABLE_GLYPHS) >= 12


def test_glyphs_are_drawn_large_enough_to_tell_apart() -> None:
    """Every confusable glyph covers many pixels, and any two glyphs differ in many pixels."""
    from aptp.world.data import GLYPH_RADIUS, WorldObject, Scene

    w = World(WorldConfig(colour_jitter=0))
    masks = {}
    for g in CONFUSABLE_GLYPHS:
        obj = WorldObject("letter", "white", "large", "center", g, (0.5, 0.5), GLYPH_RADIUS, False, False)
        masks[g] = np.asarray(w.render(Scene((obj,), (), "glyph"))).max(-1) > 120  # (32, 32)
        assert masks[g].sum() >= 60, f"{g} covers only {masks[g].sum()} pixels"
    for a in CONFUSABLE_GLYPHS:
        for b in CONFUSABLE_GLYPHS:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() >= 12, f"{a} and {b} differ in {(masks[a] ^ masks[b]).sum()} pixels"


def test_config_validation_and_restrictions() -> None:
    with pytest.raises(ValueError, match="image_size=8"):
        WorldConfig(image_size=8)
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig(colours=("red", "teal"))
    w = World(WorldConfig(max_objects=1, allow_text=False, image_size=48))
    ss = w.sample(50, seed=1)
    assert all(len(s.scene.objects) == 1 and s.scene.objects[0].shape != LETTER for s in ss)
    assert ss[0].image.size == (48, 48)


def test_dataset_items() -> None:
    ds = WorldDataset(length=10, seed=2)
    item = ds[3]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert item["caption"] == World().sample_one(2, 3).caption
    with pytest.raises(IndexError):
        ds[10]
