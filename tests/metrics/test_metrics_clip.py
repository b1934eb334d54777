"""``clip_score`` and ``cmmd`` with a tiny RANDOM CLIPModel saved to disk (see conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_helpers import rand_images
from PIL import Image

from aptp.metrics._common import MissingWeightsError
from aptp.metrics.clip_score import ClipScore, ClipScoreConfig
from aptp.metrics.cmmd import Cmmd, CmmdConfig
from aptp.metrics.mmd import mmd

PROMPTS = ["a red circle", "a small blue square on the left", "the letter \"A\" in green", "two white crosses",
           "a large yellow triangle at the top", "a purple square below a green circle"]


def hand_clip_embeddings(clip_dir, images_uint8: np.ndarray, prompts: list[str]):
    """Reference embeddings: transformers' own PIL image processor and tokenizer, the model's
    get_*_features, normalised. images_uint8: (N, H, W, 3)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clip_dir)(
        images=[Image.fromarray(im) for im in images_uint8], return_tensors="pt")["pixel_values"]
    tok = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().byte().permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------ clip_score
def test_clip_score_equals_a_hand_computation(tiny_clip_dir):
    metric = ClipScore(ClipScoreConfig(model=str(tiny_clip_dir), batch_size=4))
    # at the model's size the processor only rescales and normalises: equal to float rounding
    images = rand_images(6, size=32, seed=0)
    img, txt = hand_clip_embeddings(tiny_clip_dir, to_uint8(images), PROMPTS)
    cos = (img * txt).sum(-1)
    assert torch.allclose(metric.scores(images, PROMPTS), 100 * cos, atol=1e-3)
    assert metric.compute(images, PROMPTS) == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    # 48 x 64: resize of the short side + centre crop (PIL in the reference works on uint8, hence the tolerance)
    images = rand_images(6, size=64, height=48, seed=1)
    img, txt = hand_clip_embeddings(tiny_clip_dir, to_uint8(images), PROMPTS)
    assert torch.allclose(metric.scores(images, PROMPTS), 100 * (img * txt).sum(-1), atol=0.5)


def test_clip_score_range_determinism_and_order_invariance(tiny_clip_dir):
    images = rand_images(6, size=40, seed=2)
    value = ClipScore(ClipScoreConfig(model=str(tiny_clip_dir))).compute(images, PROMPTS)
    assert 0.0 <= value <= 100.0
    assert ClipScore(ClipScoreConfig(model=str(tiny_clip_dir), batch_size=2)).compute(images, PROMPTS) == pytest.approx(value, abs=1e-4)
    perm = torch.randperm(6)
    again = ClipScore(ClipScoreConfig(model=str(tiny_clip_dir))).compute(images[perm], [PROMPTS[i] for i in perm])
    assert again == pytest.approx(value, abs=1e-4)


def test_clip_score_clamps_per_image_or_the_mean(tiny_clip_dir):
    # white images and these prompts give the seeded random model cosines of both signs
    prompts = ["x", "zzzz", "the", "12345", "~~~~", "hello world"]
    images = torch.ones(6, 3, 32, 32)
    per_image = ClipScore(ClipScoreConfig(model=str(tiny_clip_dir)))
    s = per_image.scores(images, prompts).double()
    assert bool((s < 0).any()) and bool((s > 0).any()), f"the random model should give both signs here: {s}"
    value = per_image.compute(images, prompts)
    assert value == pytest.approx(float(s.clamp(min=0).mean()), abs=1e-6) and value > 0
    torchmetrics_like = ClipScore(ClipScoreConfig(model=str(tiny_clip_dir), clamp="mean"))
    assert torchmetrics_like.compute(images, prompts) == pytest.approx(max(float(s.mean()), 0.0), abs=1e-6)
    assert torchmetrics_like.compute(images, prompts) < value


def test_clip_score_missing_model_and_bad_config(tmp_path):
    metric = ClipScore(ClipScoreConfig(model=str(tmp_path / "no-clip-here")))  # building loads nothing
    with pytest.raises(MissingWeightsError, match=r"metrics\[0\]\.model=") as info:
        metric.compute(rand_images(2), ["a", "b"])
    assert "does not exist" in str(info.value)
    assert "huggingface-cli download openai/clip-vit-base-patch32" in str(info.value)
    with pytest.raises(ValueError, match="clamp"):
        ClipScoreConfig(clamp="none")
    with pytest.raises(ValueError, match="one prompt string per image"):
        ClipScore().compute(rand_images(2), ["only one"])


# ------------------------------------------------------------------------------------------ cmmd
def test_cmmd_identical_zero_order_invariant_deterministic(tiny_clip_dir):
    a, b = rand_images(10, size=40, seed=4), rand_images(8, size=40, seed=5).pow(3)
    metric = Cmmd(CmmdConfig(model=str(tiny_clip_dir), batch_size=3))
    assert metric.compute(a, [""] * 10, reference=a.clone()) == 0.0
    assert abs(metric.compute(a[torch.randperm(10)], [""] * 10, reference=a)) < 1e-9
    d = metric.compute(a, [""] * 10, reference=b)
    assert d > 0
    fresh = Cmmd(CmmdConfig(model=str(tiny_clip_dir)))
    assert fresh.compute(a[torch.randperm(10)], [""] * 10, reference=b[torch.randperm(8)]) == pytest.approx(d, rel=1e-5)


def test_cmmd_equals_mmd_of_hand_computed_embeddings(tiny_clip_dir):
    a, b = rand_images(6, size=32, seed=6), (rand_images(6, size=32, seed=7).sqrt() * 255).round() / 255
    ea, _ = hand_clip_embeddings(tiny_clip_dir, to_uint8(a), PROMPTS)
    eb, _ = hand_clip_embeddings(tiny_clip_dir, to_uint8(b), PROMPTS)
    metric = Cmmd(CmmdConfig(model=str(tiny_clip_dir)))
    assert torch.allclose(metric.embed(a), ea, atol=1e-5)
    assert metric.compute(a, [""] * 6, reference=b) == pytest.approx(mmd(eb, ea, sigma=10.0, scale=1000.0), rel=1e-4)


def test_cmmd_squashes_non_square_images_to_the_model_size(tiny_clip_dir):
    # CMMD's reference resizes the whole image to S x S (no crop): compare with resizing first
    metric = Cmmd(CmmdConfig(model=str(tiny_clip_dir)))
    wide = rand_images(3, size=96, height=48, seed=8)
    squashed = torch.nn.functional.interpolate(wide, size=(32, 32), mode="bicubic", antialias=True)
    assert torch.allclose(metric.embed(wide), metric.embed(squashed.clamp(0, 1)), atol=1e-3)


def test_cmmd_precomputed_reference_embeddings(tiny_clip_dir, tmp_path):
    a, b = rand_images(5, seed=9), rand_images(7, seed=10) * 0.3
    metric = Cmmd(CmmdConfig(model=str(tiny_clip_dir)))
    path = metric.save_reference_embeddings(b, tmp_path / "ref.npy")
    stored = Cmmd(CmmdConfig(model=str(tiny_clip_dir), reference_embeddings=str(path)))
    assert stored.compute(a, [""] * 5) == pytest.approx(metric.compute(a, [""] * 5, reference=b), rel=1e-9)
    with pytest.raises(ValueError, match="reference"):
        metric.compute(a, [""] * 5)


def test_cmmd_missing_model_and_bad_config(tmp_path):
    with pytest.raises(MissingWeightsError, match="openai/clip-vit-large-patch14-336"):
        Cmmd(CmmdConfig(model=str(tmp_path / "none"))).compute(rand_images(2), ["", ""], reference=rand_images(2))
    with pytest.raises(ValueError, match="sigma"):
        CmmdConfig(sigma=0.0)
