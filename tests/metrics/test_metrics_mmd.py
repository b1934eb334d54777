"""RBF MMD (CMMD's formulation) on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from aptp.metrics.mmd import SCALE, SIGMA, mmd


def loop_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float, scale: float, unbiased: bool) -> float:
    """Direct O(N^2) double loop over pairs, in Python floats."""
    def k(a, b):
        return math.exp(-sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)) / (2 * sigma**2))

    n, m = len(x), len(y)
    if unbiased:
        kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    else:
        kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / n**2
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return scale * (kxx + kyy - 2 * kxy)


def test_defaults_are_cmmds_sigma_and_scale():
    assert SIGMA == 10.0 and SCALE == 1000.0
    x, y = torch.randn(6, 5), torch.randn(7, 5) * 4 + 3
    assert mmd(x, y) == pytest.approx(loop_mmd(x, y, 10.0, 1000.0, False), rel=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_a_direct_double_loop(unbiased):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3 + 2
    assert mmd(x, y, sigma=2.5, scale=1.0, unbiased=unbiased) == pytest.approx(
        loop_mmd(x, y, 2.5, 1.0, unbiased), rel=1e-10, abs=1e-14)


def test_two_points_closed_form():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 6.0, 3.0]])  # |a - b|^2 = 25
    assert mmd(a, b, sigma=10.0, scale=1000.0) == pytest.approx(1000 * (2 - 2 * math.exp(-25 / 200)), rel=1e-12)


def test_identical_sets_give_zero_and_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 16, generator=g), torch.randn(30, 16, generator=g) + 0.5
    assert mmd(x, x.clone()) == 0.0
    assert abs(mmd(x, x[torch.randperm(40, generator=g)])) < 1e-12
    d = mmd(x, y)
    assert mmd(x[torch.randperm(40, generator=g)], y[torch.randperm(30, generator=g)]) == pytest.approx(d, rel=1e-10)
    assert mmd(y, x) == pytest.approx(d, rel=1e-12)


def test_grows_with_the_mean_shift():
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    values = [mmd(x, noise + shift) for shift in (0.0, 1.0, 3.0, 10.0, 30.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    # far apart, the cross kernel vanishes: MMD -> scale * (mean k_xx + mean k_yy), each mean in (0, 1)
    from aptp.metrics.mmd import kernel_sum

    gamma = 1 / (2 * 10.0**2)
    kxx = kernel_sum(x.double(), x.double(), gamma) / 50**2
    kyy = kernel_sum(noise.double(), noise.double(), gamma) / 50**2
    assert values[-1] == pytest.approx(1000 * (kxx + kyy), rel=1e-6)  # noise + 30 in float32: ~1e-6
    assert 1000 < values[-1] < 2000


def test_blocks_do_not_change_the_sum():
    from aptp.metrics.mmd import kernel_sum

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(23, 5, generator=g).double(), torch.randn(17, 5, generator=g).double()
    for skip in (False, True):
        a = kernel_sum(x, x if skip else y, 0.1, skip_diagonal=skip, block=4)
        b = kernel_sum(x, x if skip else y, 0.1, skip_diagonal=skip)
        assert a == pytest.approx(b, rel=1e-12)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same width"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="sigma"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), sigma=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2), unbiased=True)


def test_property_biased_mmd_is_nonnegative_symmetric_and_zero_on_itself():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.1, 50.0))
    def check(n, m, d, seed, spread):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, d, generator=g) * spread, torch.randn(m, d, generator=g)
        v = mmd(x, y)
        assert v >= -1e-9 and v == pytest.approx(mmd(y, x), rel=1e-9, abs=1e-9)
        assert mmd(x, x.clone()) == 0.0

    check()
