"""RBF-kernel maximum mean discrepancy, as CMMD computes it (Jayasumana et al., 2024).

The reference formulation (google-research ``cmmd/distance.py``) is followed exactly::

    gamma = 1 / (2 sigma^2)                    sigma = 10
    k(a, b) = exp(-gamma * (||a||^2 + ||b||^2 - 2 a.b))
    MMD^2 = scale * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j))    scale = 1000

with every mean over *all* pairs, diagonals included (the biased V-statistic): identical sets give
exactly 0 and the value is never negative. ``unbiased=True`` gives the U-statistic instead (the
x-x and y-y means leave out the diagonal: an unbiased estimate of MMD^2 that can be negative);
it is not what CMMD reports.

Computed in float64 and in row blocks, so memory stays O(block * N) for tens of thousands of
embeddings (the reference builds the full N x N matrices); the result is the same sum.
"""

from __future__ import annotations

import torch

SIGMA = 10.0
SCALE = 1000.0


def _as_float64(x: object, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must be an (N, D) matrix with N >= 1, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t


def kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, skip_diagonal: bool = False,
               block: int = 2048) -> float:
    """sum_ij exp(-gamma ||a_i - b_j||^2) over a (N, D) x b (M, D), float64, in row blocks.

    ``skip_diagonal`` leaves out the pairs i == j (only meaningful when ``a`` is ``b``)."""
    b_sq = (b * b).sum(dim=1)  # (M,)
    total = 0.0
    for start in range(0, a.shape[0], block):
        ab = a[start:start + block]  # (n, D)
        a_sq = (ab * ab).sum(dim=1)  # (n,)
        d2 = -2.0 * ab @ b.T + a_sq[:, None] + b_sq[None, :]  # (n, M) squared distances
        k = torch.exp(-gamma * d2)  # (n, M)
        if skip_diagonal:
            rows = torch.arange(ab.shape[0])
            k[rows, rows + start] = 0.0
        total += float(k.sum())
    return total


def mmd(x: object, y: object, sigma: float = SIGMA, scale: float = SCALE, unbiased: bool = False) -> float:
    """scale * MMD^2 between embeddings x (N, D) and y (M, D) with an RBF kernel of width sigma.

    Default: CMMD's biased estimator (see the module docstring); ``unbiased=True``: the U-statistic.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")
    xt, yt = _as_float64(x, "x"), _as_float64(y, "y")
    if xt.shape[1] != yt.shape[1]:
        raise ValueError(f"x and y must have the same width, got {xt.shape[1]} and {yt.shape[1]}.")
    n, m = xt.shape[0], yt.shape[0]
    gamma = 1.0 / (2.0 * sigma**2)
    if unbiased:
        if n < 2 or m < 2:
            raise ValueError(f"the unbiased estimator needs at least 2 samples per set, got {n} and {m}.")
        k_xx = kernel_sum(xt, xt, gamma, skip_diagonal=True) / (n * (n - 1))
        k_yy = kernel_sum(yt, yt, gamma, skip_diagonal=True) / (m * (m - 1))
    else:
        k_xx = kernel_sum(xt, xt, gamma) / (n * n)
        k_yy = kernel_sum(yt, yt, gamma) / (m * m)
    k_xy = kernel_sum(xt, yt, gamma) / (n * m)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))
