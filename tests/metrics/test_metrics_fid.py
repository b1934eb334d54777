"""``fid`` with a TorchScript stand-in for inception-2015-12-05.pt (see conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_helpers import rand_images, tiny_inception_features
from PIL import Image

from aptp.metrics._common import MissingWeightsError
from aptp.metrics.fid import Fid, FidConfig
from aptp.metrics.frechet import frechet_distance_features


def pil_resize_299(images: torch.Tensor) -> torch.Tensor:
    """clean-fid's "clean" resizer, independently: uint8 levels, PIL bicubic per channel in float
    mode 'F', clipped to [0, 255]. (N, 3, H, W) in [0, 1] -> (N, 3, 299, 299) in [0, 255]."""
    out = np.zeros((images.shape[0], 3, 299, 299), dtype=np.float32)
    arr = (images * 255).round().numpy()
    for i in range(images.shape[0]):
        for c in range(3):
            im = Image.fromarray(arr[i, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            out[i, c] = np.asarray(im).clip(0, 255)
    return torch.from_numpy(out)


def test_missing_weights_say_where_to_get_them_and_which_key_to_set(tmp_path):
    fid = Fid()  # building loads nothing
    with pytest.raises(MissingWeightsError, match=r"inception-2015-12-05\.pt") as info:
        fid.compute(rand_images(4), [""] * 4, reference=rand_images(4, seed=1))
    msg = str(info.value)
    assert "metrics[0].inception_path=" in msg and "https://" in msg
    with pytest.raises(MissingWeightsError, match="does not exist"):
        Fid(FidConfig(inception_path=str(tmp_path / "nope.pt"))).load()
    not_script = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, not_script)
    with pytest.raises(ValueError, match="not a TorchScript model"):
        Fid(FidConfig(inception_path=str(not_script))).load()


def test_identical_sets_give_zero_and_different_sets_do_not(tiny_inception_path):
    fid = Fid(FidConfig(inception_path=str(tiny_inception_path), batch_size=7))
    a, b = rand_images(24, size=40, seed=0), rand_images(24, size=40, seed=1) * 0.5
    assert abs(fid.compute(a, [""] * 24, reference=a.clone())) < 1e-8
    assert fid.compute(a, [""] * 24, reference=b) > 1.0


def test_matches_a_hand_computation_with_pil_resizing(tiny_inception_path):
    # 40 x 40 (upsampling) and 512 x 512 (downsampling, where antialiasing matters)
    for size, n in ((40, 20), (512, 18)):
        a, b = rand_images(n, size=size, seed=2), rand_images(n, size=size, seed=3).pow(2)
        fid = Fid(FidConfig(inception_path=str(tiny_inception_path)))
        got = fid.compute(a, [""] * n, reference=b)
        fa, fb = tiny_inception_features(pil_resize_299(a)), tiny_inception_features(pil_resize_299(b))
        expected = frechet_distance_features(fa.double(), fb.double(), method="sqrtm")
        assert got == pytest.approx(expected, rel=1e-6), size  # measured: 5e-8
        assert np.allclose(fid.features(a), fa.double().numpy(), atol=1e-5)


def test_order_invariance_and_legacy_bilinear_resizer(tiny_inception_path):
    a, b = rand_images(20, seed=4), rand_images(16, seed=5).sqrt()
    fid = Fid(FidConfig(inception_path=str(tiny_inception_path)))
    d = fid.compute(a, [""] * 20, reference=b)
    assert fid.compute(a[torch.randperm(20)], [""] * 20, reference=b[torch.randperm(16)]) == pytest.approx(d, rel=1e-9)
    legacy = Fid(FidConfig(inception_path=str(tiny_inception_path), resize_filter="bilinear"))
    x = legacy.prepare(a[:2])
    expected = torch.nn.functional.interpolate((a[:2] * 255).round(), size=(299, 299), mode="bilinear",
                                               align_corners=False)
    assert torch.allclose(x, expected, atol=1e-4)


def test_precomputed_reference_statistics(tiny_inception_path, tmp_path):
    a, b = rand_images(20, seed=6), rand_images(20, seed=7) * 0.8
    fid = Fid(FidConfig(inception_path=str(tiny_inception_path)))
    path = fid.save_reference_stats(b, tmp_path / "ref_stats.npz")
    with np.load(path) as data:
        assert data["mu"].shape == (16,) and data["sigma"].shape == (16, 16)
    from_stats = Fid(FidConfig(inception_path=str(tiny_inception_path), reference_stats=str(path)))
    assert from_stats.compute(a, [""] * 20) == pytest.approx(fid.compute(a, [""] * 20, reference=b), rel=1e-12)
    with pytest.raises(ValueError, match="reference"):
        fid.compute(a, [""] * 20)


def test_config_and_input_validation(tiny_inception_path):
    with pytest.raises(ValueError, match="resize_filter"):
        FidConfig(resize_filter="lanczos")
    with pytest.raises(ValueError, match="method"):
        FidConfig(method="svd")
    fid = Fid(FidConfig(inception_path=str(tiny_inception_path)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.features(rand_images(3) * 2 - 1)
