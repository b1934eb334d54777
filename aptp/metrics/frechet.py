"""Fréchet distance between two Gaussians, and between two feature sets (FID's distance).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

Everything is computed in float64 NumPy. The one delicate term is ``tr((S1 S2)^{1/2})``; two
ways are offered (``method=``):

* ``"eigh"`` (default): with symmetric square roots ``R1 = S1^{1/2}``, ``R2 = S2^{1/2}`` (from
  symmetric eigen-decompositions, rounding-negative eigenvalues set to 0), ``S1 S2`` is similar to
  the symmetric PSD ``R1 S2 R1 = (R2 R1)^T (R2 R1)`` (for invertible ``S1``; by continuity for every
  PSD ``S1``), so ``tr((S1 S2)^{1/2})`` is the sum of the singular values of ``R2 R1`` (its nuclear
  norm). Real by construction, finite on rank-deficient covariances (fewer samples than
  dimensions, ``S1 S2`` singular), and accurate to ~``eps * ||S||``: taking eigenvalues of the
  product first and their square roots after would lose half the digits (``sqrt(eps) * ||S||``)
  on ill-conditioned covariances.
* ``"sqrtm"``: clean-fid's / pytorch-fid's computation, ``scipy.linalg.sqrtm(S1 @ S2)``; when the
  result is not finite, retried on ``(S1 + eps I)(S2 + eps I)``; an imaginary part with a diagonal
  entry above 1e-3 raises, a smaller one is dropped. Use it to reproduce published FIDs bit-for-bit
  with those tools; both methods agree to rounding on well-conditioned covariances.

Covariances use the unbiased estimator (``np.cov(features, rowvar=False)``, divisor N - 1), as
clean-fid and pytorch-fid do.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

METHODS = ("eigh", "sqrtm")


def _as_float64(x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()  # type: ignore[union-attr]
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: object) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2, in float64."""
    f = _as_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be an (N, D) array with N >= 2 samples, got shape {f.shape}.")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values; check the feature extractor's input.")
    mu = f.mean(axis=0)  # (D,)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))  # (D, D)
    return mu, sigma


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"Gaussian {which}: mean must be (D,) and covariance (D, D), got {mu.shape} and {sigma.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"Gaussian {which}: mean or covariance contains NaN or infinite values.")


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (D, D); eigenvalues made negative by rounding -> 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)  # (D,), (D, D)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh", eps: float = 1e-6) -> float:
    """tr((S1 S2)^{1/2}) for PSD covariances (D, D); see the module docstring for ``method``."""
    if method == "eigh":
        r1, r2 = _psd_sqrt(sigma1), _psd_sqrt(sigma2)  # S1^{1/2}, S2^{1/2}  (D, D)
        return float(np.linalg.svd(r2 @ r1, compute_uv=False).sum())  # nuclear norm of S2^{1/2} S1^{1/2}
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(
                    f"sqrtm(S1 S2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                    "the covariances are too ill-conditioned for method='sqrtm': use method='eigh'."
                )
            covmean = covmean.real
        return float(np.trace(covmean))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def frechet_distance(mu1: object, sigma1: object, mu2: object, sigma2: object,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, S1) and N(mu2, S2); means (D,), covariances (D, D)."""
    m1, s1, m2, s2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    m1, m2 = np.atleast_1d(m1), np.atleast_1d(m2)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    _check_gaussian(m1, s1, "1")
    _check_gaussian(m2, s2, "2")
    if m1.shape != m2.shape:
        raise ValueError(f"the two Gaussians have different dimensions: {m1.shape[0]} and {m2.shape[0]}.")
    diff = m1 - m2  # (D,)
    tr_covmean = trace_sqrt_product(s1, s2, method=method, eps=eps)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_features(features1: object, features2: object, method: str = "eigh") -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2, method=method)
