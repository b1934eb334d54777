"""World evaluator: scoring logic, evaluate_base's feature-set distances (the framework's FD / MMD), and the
shipped weights on real renders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aptp.world.data import EVERY_KIND_MIX, World, WorldConfig, single_object_scene
from aptp.world.tools.evaluate_base import feature_distances
from aptp.world.evaluator import (
    COLOUR_CLASSES,
    DEFAULT_EVALUATOR_DIR,
    GLYPH_CLASSES,
    SHAPE_CLASSES,
    SIZE_CLASSES,
    SlotPrediction,
    _score_one,
    attribute_accuracy,
    load_evaluator,
    scene_targets,
    score_images,
)

#: A world seed used neither by train_base (1000), train_evaluator (2000, val 777777) nor evaluate_base.
TEST_SEED = 31_337


def _one_hot_prediction(scenes) -> SlotPrediction:
    """The prediction a perfect evaluator would make for these scenes."""
    probs = {}
    for head, classes in (("colour", COLOUR_CLASSES), ("shape", SHAPE_CLASSES), ("size", SIZE_CLASSES), ("glyph", GLYPH_CLASSES)):
        t = torch.tensor([scene_targets(s)[head] for s in scenes]).clamp(min=0)  # (B, 5)
        probs[head] = torch.nn.functional.one_hot(t, len(classes)).float()
    return SlotPrediction(**probs)


def test_perfect_prediction_scores_everything_right() -> None:
    samples = World(WorldConfig(mix=EVERY_KIND_MIX)).sample(200, seed=TEST_SEED)
    scenes = [s.scene for s in samples]
    p = _one_hot_prediction(scenes)
    res = [_score_one(p, b, s) for b, s in enumerate(scenes)]
    acc = attribute_accuracy(res)
    assert all(v == 1.0 for v in acc.values() if v is not None), acc
    assert acc["relation"] == 1.0 and acc["glyph"] == 1.0  # those kinds are in the sample


def test_wrong_attributes_are_caught() -> None:
    scene = single_object_scene("circle", "red", "large", "top")
    wrong_colour = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour="blue"),))
    wrong_place = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], position="left"),))
    p = _one_hot_prediction([scene])
    r = _score_one(p, 0, wrong_colour)
    assert r["colour"] is False and r["shape"] is True and r["all"] is False
    r = _score_one(p, 0, wrong_place)
    assert r["position"] is False and r["all"] is False
    # an unstated slot is matched wherever the object is
    unstated = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], position="left", position_stated=False, size_stated=False),))
    r = _score_one(p, 0, unstated)
    assert r["colour"] and r["shape"] and r["position"] is None and r["size"] is None and r["all"]


def test_feature_distances_are_the_framework_metrics() -> None:
    """evaluate_base's FD / MMD: aptp.metrics' Fréchet distance (sqrtm) and unbiased RBF MMD with the
    median bandwidth, x1000; the world package defines no distance of its own."""
    import aptp.world.evaluator as evaluator_module
    from aptp.metrics.frechet import frechet_distance_features
    from aptp.metrics.mmd import mmd
    from aptp.world.tools.evaluate_base import median_bandwidth

    assert not hasattr(evaluator_module, "frechet_distance") and not hasattr(evaluator_module, "mmd")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    c = torch.randn(400, 8, generator=g) + 1.0
    assert abs(feature_distances(a, a)["frechet_distance"]) < 1e-6
    ab, ac = feature_distances(a, b), feature_distances(a, c)
    assert ab["frechet_distance"] < 0.5 < 7.0 < ac["frechet_distance"]  # ≈ 8 (mean shift of 1 in 8 dims)
    assert abs(ab["mmd_x1000"]) < 10 < 100 < ac["mmd_x1000"]
    assert ac["frechet_distance"] == frechet_distance_features(a, c, method="sqrtm")
    assert ac["mmd_x1000"] == mmd(a, c, sigma=median_bandwidth(a, c), scale=1000.0, unbiased=True)
    # the median bandwidth, by hand on a small set
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0]])
    assert median_bandwidth(x, y) == 2.0  # pairwise distances 1, 2, 3 (each twice)
    with pytest.raises(ValueError, match="at least 2"):
        feature_distances(a[:1], b)


def test_shipped_evaluator_reads_real_renders() -> None:
    assert (DEFAULT_EVALUATOR_DIR / "model.safetensors").is_file(), "evaluator weights are not shipped"
    ev = load_evaluator()
    single = World(WorldConfig(partial_prob=0.0)).sample(120, seed=TEST_SEED, kind="single")
    acc = attribute_accuracy(score_images(ev, [s.image for s in single], [s.scene for s in single]))
    # chance: colour 1/6, shape 1/4, size 1/2, position 1/5
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.9 and acc["size"] >= 0.9 and acc["position"] >= 0.95, acc
    # objects drawn off their slot centre (as generated images do) are read in the nearest slot
    off = World(WorldConfig(partial_prob=0.0, jitter=0.12)).sample(120, seed=TEST_SEED, kind="single")
    acc_off = attribute_accuracy(score_images(ev, [s.image for s in off], [s.scene for s in off]))
    assert acc_off["colour"] >= 0.95 and acc_off["shape"] >= 0.85 and acc_off["position"] >= 0.9, acc_off
    hard = World(WorldConfig(mix=EVERY_KIND_MIX)).sample(200, seed=TEST_SEED + 1)
    hard = [s for s in hard if len(s.scene.objects) > 1 or s.scene.kind == "text"]
    acc_hard = attribute_accuracy(score_images(ev, [s.image for s in hard], [s.scene for s in hard]))
    assert acc_hard["colour"] >= 0.85 and acc_hard["shape"] >= 0.8 and acc_hard["relation"] >= 0.85, acc_hard
    # features: renders of the same world are closer to each other than to noise
    f1, f2 = ev.embed([s.image for s in single[:60]]), ev.embed([s.image for s in single[60:]])
    noise = ev.embed(torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    near, far = feature_distances(f1, f2), feature_distances(f1, noise)
    assert near["frechet_distance"] < far["frechet_distance"] and near["mmd_x1000"] < far["mmd_x1000"]


def test_shipped_evaluator_reads_every_kind_of_the_graded_world() -> None:
    """The evaluator is right on clean renders of each graded kind (>= 0.98 whole-scene)."""
    ev = load_evaluator()
    for kind in ("plain", "placed", "glyph"):
        ss = World().sample(100, seed=TEST_SEED + 7, kind=kind)
        acc = attribute_accuracy(score_images(ev, [s.image for s in ss], [s.scene for s in ss]))
        assert acc["all"] >= 0.98, (kind, acc)
