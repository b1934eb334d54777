"""Fréchet distance on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from aptp.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_features

METHODS = ["eigh", "sqrtm"]


def random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", METHODS)
def test_identical_gaussians_are_at_distance_zero(method):
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=20), random_cov(rng, 20)
    assert abs(frechet_distance(mu, s, mu, s, method=method)) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_covariances_match_the_closed_form(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    v1, v2 = rng.uniform(0.1, 3.0, size=12), rng.uniform(0.1, 3.0, size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_scaled_full_covariance_matches_the_closed_form(method):
    # S2 = c^2 S1  =>  tr((S1 S2)^1/2) = c tr(S1)  =>  d = |mu1 - mu2|^2 + (1 - c)^2 tr(S1)
    rng = np.random.default_rng(2)
    s1, c = random_cov(rng, 15), 1.7
    mu1, mu2 = rng.normal(size=15), rng.normal(size=15)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c**2 * s1, method=method) == pytest.approx(expected, rel=1e-9)


def test_methods_agree_and_are_symmetric_on_general_covariances():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    s1, s2 = random_cov(rng, 30), random_cov(rng, 30)
    a = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    b = frechet_distance(mu2, s2, mu1, s1, method="eigh")
    c = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    # an independent value: scipy's sqrtm of the product, as pytorch-fid computes it
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert a == pytest.approx(b, rel=1e-10)
    assert a == pytest.approx(c, rel=1e-9)
    assert a == pytest.approx(ref, rel=1e-9)
    assert a > 0


def test_feature_sets_order_invariance_and_symmetry():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 8)), rng.normal(loc=0.3, size=(150, 8))
    d = frechet_distance_features(x, y)
    assert frechet_distance_features(x[rng.permutation(200)], y[rng.permutation(150)]) == pytest.approx(d, rel=1e-10)
    assert frechet_distance_features(y, x) == pytest.approx(d, rel=1e-10)
    assert abs(frechet_distance_features(x, x.copy())) < 1e-10


def test_statistics_are_the_mean_and_unbiased_covariance():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 4))
    mu, s = feature_statistics(x)
    assert np.allclose(mu, x.mean(0))
    assert np.allclose(s, (x - x.mean(0)).T @ (x - x.mean(0)) / 49)
    assert mu.dtype == np.float64 and s.dtype == np.float64


def test_rank_deficient_covariances_stay_real_and_finite():
    # N = 10 samples in D = 64 dimensions: covariances of rank 9, S1 S2 singular.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 64))
    assert abs(frechet_distance_features(x, x.copy())) < 1e-8
    # y = c x + shift: S2 = c^2 S1 exactly, rank-deficient; closed form still holds
    shift, c = rng.normal(size=64), 0.5
    y = c * x + shift
    mu1, s1 = feature_statistics(x)
    expected = np.sum((mu1 - (c * mu1 + shift)) ** 2) + (1 - c) ** 2 * np.trace(s1)
    got = frechet_distance_features(x, y)
    assert np.isfinite(got) and isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-8)
    z = rng.normal(size=(12, 64))
    other = frechet_distance_features(x, z)
    assert np.isfinite(other) and other > 0


def test_bad_inputs_are_rejected_with_the_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_property_symmetric_nonnegative_and_zero_on_itself():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
    def check(d, seed, spread):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=(d, d)) * spread, rng.normal(size=(d, d))
        s1, s2 = a @ a.T, b @ b.T  # PSD, possibly ill-conditioned
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        x = frechet_distance(mu1, s1, mu2, s2)
        scale = np.trace(s1) + np.trace(s2) + 1.0
        assert np.isfinite(x) and x >= -1e-9 * scale
        assert x == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7, abs=1e-9 * scale)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * scale

    check()
