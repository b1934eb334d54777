"""Presets, the evaluate() helper and the evaluation protocols."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from metrics_helpers import rand_images
from PIL import Image

from aptp.core.config import compose, instantiate_config
from aptp.core.plugins import default_registry
from aptp.metrics import build_metrics, evaluate
from aptp.metrics.clip_score import ClipScore, ClipScoreConfig
from aptp.metrics.cmmd import Cmmd, CmmdConfig
from aptp.metrics.fid import Fid, FidConfig
from aptp.metrics.protocols import cc3m_val, coco2014_val, load_images

METRICS = ["fid", "clip_score", "cmmd", "world_accuracy", "world_fd", "world_mmd"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", METRICS)
def test_each_preset_validates_and_equals_the_default_config(name):
    cfg = compose({"defaults": [{"metrics": name}]}, search_path=[CONFIGS])
    spec = default_registry()["metric"].get(name)
    assert instantiate_config(spec, cfg.metrics[0]) == spec.default_config()


def test_evaluate_computes_every_metric_in_one_call(tiny_clip_dir, tiny_inception_path):
    metrics = build_metrics([
        {"name": "fid", "inception_path": str(tiny_inception_path)},
        {"name": "clip_score", "model": str(tiny_clip_dir)},
        {"name": "cmmd", "model": str(tiny_clip_dir)},
        {"name": "cmmd", "model": str(tiny_clip_dir), "sigma": 1.0},
    ])
    assert list(metrics) == ["fid", "clip_score", "cmmd", "cmmd#2"]
    images, reference = rand_images(20, size=40, seed=0), rand_images(20, size=40, seed=1).pow(2)
    prompts = [f"a red circle number {i}" for i in range(20)]
    row = evaluate(images, prompts, metrics, reference=reference)
    assert list(row) == list(metrics)
    assert row["fid"] == pytest.approx(Fid(FidConfig(inception_path=str(tiny_inception_path))).compute(
        images, prompts, reference=reference), rel=1e-9)
    assert row["clip_score"] == pytest.approx(ClipScore(ClipScoreConfig(model=str(tiny_clip_dir))).compute(
        images, prompts), abs=1e-6)
    assert row["cmmd#2"] == pytest.approx(Cmmd(CmmdConfig(model=str(tiny_clip_dir), sigma=1.0)).compute(
        images, prompts, reference=reference), rel=1e-9)
    assert row["cmmd#2"] > row["cmmd"] > 0  # narrower kernel, larger discrepancy on these sets
    # a sequence of metrics is reported under their names; repeated names must be disambiguated
    assert evaluate(images, prompts, [metrics["clip_score"]]) == {"clip_score": row["clip_score"]}
    with pytest.raises(ValueError, match="two metrics are named 'cmmd'"):
        evaluate(images, prompts, [metrics["cmmd"], metrics["cmmd#2"]], reference=reference)
    with pytest.raises(ValueError, match="one prompt string per image"):
        evaluate(images, prompts[:3], metrics)


def test_build_metrics_rejects_unknown_names():
    from aptp.core.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="fid"):
        build_metrics(["fdi"])


# ------------------------------------------------------------------------------------- protocols
def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture()
def tiny_coco(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    data = {"images": [], "annotations": []}
    for i in range(10):
        name = f"COCO_val2014_{i:012d}.jpg"
        _image(images / name, (20 * i, 100, 200))
        data["images"].append({"id": i, "file_name": name})
        for k in range(5):
            data["annotations"].append({"image_id": i, "id": 10 * i + k, "caption": f"image {i} caption {k}"})
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps(data))
    return ann, images


def test_coco_protocol_one_caption_per_image_seeded_subset(tiny_coco):
    ann, image_dir = tiny_coco
    prompts, paths = coco2014_val(ann, image_dir, limit=None, seed=0)
    assert len(prompts) == len(paths) == 10
    for p, path in zip(prompts, paths):  # each caption belongs to its image
        assert p.startswith(f"image {int(path.stem.split('_')[-1])} caption") and path.is_file()
    sub, sub_paths = coco2014_val(ann, image_dir, limit=4, seed=1)
    assert len(sub) == 4 and len(set(sub_paths)) == 4
    assert (sub, sub_paths) == coco2014_val(ann, image_dir, limit=4, seed=1)
    assert set(sub_paths) <= set(coco2014_val(ann, image_dir, limit=None, seed=1)[1])
    assert coco2014_val(ann, image_dir, limit=None, seed=2)[0] != prompts  # another seed, other captions
    with pytest.raises(ValueError, match="limit"):
        coco2014_val(ann, image_dir, limit=0)


def test_cc3m_protocol_skips_missing_images_and_loads_references(tmp_path):
    rows = ["caption\timage"]
    for i in range(6):
        if i != 3:  # image 3 is missing, as rotted CC3M URLs are
            _image(tmp_path / f"{i}.jpg", (40 * i, 0, 0))
        rows.append(f"caption number {i}\t{i}.jpg")
    (tmp_path / "val.tsv").write_text("\n".join(rows) + "\n")
    prompts, paths = cc3m_val(tmp_path / "val.tsv")
    assert prompts == [f"caption number {i}" for i in (0, 1, 2, 4, 5)]
    assert len(cc3m_val(tmp_path / "val.tsv", skip_missing=False)[0]) == 6
    assert len(cc3m_val(tmp_path / "val.tsv", limit=2, seed=0)[0]) == 2
    x = load_images(paths, resolution=16)
    assert x.shape == (5, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.allclose(x[1, 0], torch.full((16, 16), 40 / 255), atol=2 / 255)  # JPEG: red channel of image 1
