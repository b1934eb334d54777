"""The embedded world's metrics: caption parsing, and world_accuracy / world_fd / world_mmd with a
RANDOM world evaluator saved in the evaluator's own folder format (model.safetensors + config.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from metrics_helpers import rand_images

from aptp.world.data import EVERY_KIND_MIX, World, WorldConfig
from aptp.metrics._common import MissingWeightsError
from aptp.metrics.frechet import frechet_distance_features
from aptp.metrics.mmd import mmd
from aptp.metrics.world_accuracy import WorldAccuracy, WorldAccuracyConfig, parse_world_caption
from aptp.metrics.world_fd import WorldFd, WorldFdConfig
from aptp.metrics.world_mmd import WorldMmd, WorldMmdConfig
from aptp.world.evaluator import Evaluator, attribute_accuracy, load_evaluator, score_images


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("world_evaluator")
    torch.manual_seed(0)
    model = Evaluator(image_size=32, width=8, feature_dim=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"image_size": 32, "width": 8, "feature_dim": 32}))
    return path


@pytest.fixture(scope="module")
def world_samples():
    samples = World(WorldConfig()).sample(48, seed=11)
    images = torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]))
    return images.permute(0, 3, 1, 2) / 255.0, [s.caption for s in samples], [s.scene for s in samples]


def _checked(scene):
    """What the evaluator's scoring reads from a scene."""
    objs = [(o.shape, o.colour, o.glyph, o.size_stated, o.size if o.size_stated else None, o.position_stated,
             o.position if o.position_stated else None) for o in scene.objects]
    return objs, [(r.subject, r.kind, r.reference) for r in scene.relations]


def test_parsing_inverts_the_world_caption_grammar():
    for s in World(WorldConfig()).sample(300, seed=3):  # the default graded world: kinds come back too
        scene = parse_world_caption(s.caption)
        assert scene.caption() == s.caption
        assert _checked(scene) == _checked(s.scene), s.caption
        assert scene.kind == s.scene.kind and scene.difficulty == s.difficulty
    for s in World(WorldConfig(mix=EVERY_KIND_MIX)).sample(300, seed=3):  # every kind: what is checked
        scene = parse_world_caption(s.caption)
        assert scene.caption() == s.caption
        assert _checked(scene) == _checked(s.scene), s.caption


@pytest.mark.parametrize("caption", ["a photo of a cat", "a red circle on the moon", "a red circle at the top and "
                                     "a blue square at the top", "the letter \"Q\" in red"])
def test_parsing_rejects_captions_outside_the_world(caption):
    with pytest.raises(ValueError, match="world caption"):
        parse_world_caption(caption)


def test_world_accuracy_equals_scoring_against_the_true_scenes(evaluator_dir, world_samples):
    images, captions, scenes = world_samples
    metric = WorldAccuracy(WorldAccuracyConfig(evaluator=str(evaluator_dir), batch_size=20))
    ev = load_evaluator(evaluator_dir)
    expected = score_images(ev, images * 2 - 1, scenes)
    assert metric.results(images, captions) == expected
    acc = attribute_accuracy(expected)
    assert metric.accuracies(images, captions) == acc
    assert metric.compute(images, captions) == pytest.approx(acc["all"])
    colour = WorldAccuracy(WorldAccuracyConfig(evaluator=str(evaluator_dir), attribute="colour"))
    assert colour.compute(images, captions) == pytest.approx(acc["colour"])
    # images at another size are resized to the evaluator's
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert 0.0 <= metric.compute(big, captions) <= 1.0


def test_world_fd_and_mmd_match_hand_computations(evaluator_dir, world_samples):
    images, captions, _ = world_samples
    a, b = images[:24], images[24:]
    ev = load_evaluator(evaluator_dir)
    with torch.no_grad():
        fa, fb = ev.embed(a * 2 - 1).double(), ev.embed(b * 2 - 1).double()
    fd = WorldFd(WorldFdConfig(evaluator=str(evaluator_dir), batch_size=7))
    assert fd.compute(a, captions[:24], reference=b) == pytest.approx(frechet_distance_features(fa, fb), rel=1e-4)
    assert abs(fd.compute(a, captions[:24], reference=a.clone())) < 1e-8
    perm = torch.randperm(24)
    assert fd.compute(a[perm], captions[:24], reference=b) == pytest.approx(fd.compute(a, captions[:24], reference=b), rel=1e-4)  # float32 features, other batches
    wm = WorldMmd(WorldMmdConfig(evaluator=str(evaluator_dir)))
    norm = torch.nn.functional.normalize
    assert wm.compute(a, captions[:24], reference=b) == pytest.approx(mmd(norm(fb, dim=-1), norm(fa, dim=-1)), rel=1e-4)
    assert wm.compute(a, captions[:24], reference=a.clone()) == 0.0
    assert wm.compute(a[perm], captions[:24], reference=b) == pytest.approx(wm.compute(a, captions[:24], reference=b), rel=1e-4)  # float32 features, other batches
    with pytest.raises(ValueError, match="reference"):
        wm.compute(a, captions[:24])


def test_missing_evaluator_says_how_to_get_one(tmp_path):
    for metric in (WorldAccuracy(WorldAccuracyConfig(evaluator=str(tmp_path))),
                   WorldFd(WorldFdConfig(evaluator=str(tmp_path))), WorldMmd(WorldMmdConfig(evaluator=str(tmp_path)))):
        assert not metric.can_probe()
        with pytest.raises(MissingWeightsError, match=r"train_evaluator.*metrics\[0\]\.evaluator="):
            metric.compute(rand_images(2), ["a red circle"] * 2, reference=rand_images(2, seed=1))


def test_world_configs_are_validated():
    with pytest.raises(ValueError, match="attribute"):
        WorldAccuracyConfig(attribute="texture")
    with pytest.raises(ValueError, match="sigma"):
        WorldMmdConfig(sigma=-1.0)
    with pytest.raises(ValueError, match="method"):
        WorldFdConfig(method="svd")


def test_contract_probe_computes_world_metrics_when_the_evaluator_is_there(evaluator_dir):
    from aptp.testing import PROBES

    probe = PROBES["metric"]
    for make in (lambda: WorldAccuracy(WorldAccuracyConfig(evaluator=str(evaluator_dir))),
                 lambda: WorldFd(WorldFdConfig(evaluator=str(evaluator_dir))),
                 lambda: WorldMmd(WorldMmdConfig(evaluator=str(evaluator_dir)))):
        first, second = probe(make()), probe(make())
        assert isinstance(first, float) and first == second
    assert WorldFd(WorldFdConfig(evaluator=str(evaluator_dir))).can_probe()
