"""Property tests (hypothesis) of the balancers on random cosine-range score matrices."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aptp.routers.balancers import (
    EmdBalancer,
    PotSinkhornBalancer,
    SinkhornBalancer,
    SinkhornConfig,
    balanced_assignment,
)

shapes = st.tuples(st.integers(1, 120), st.integers(1, 24))


def scores_of(B: int, K: int, seed: int, skew: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, K, generator=g) * 2 - 1
    s[:, 0] += skew
    return s.clamp(-1, 1)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), skew=st.sampled_from([0.0, 0.5, 2.0]))
def test_plans_are_finite_with_balanced_marginals(shape, seed, skew):
    B, K = shape
    s = scores_of(B, K, seed, skew)
    for balancer, tol in ((SinkhornBalancer(SinkhornConfig(tolerance=1e-3)), 2e-3),
                          (PotSinkhornBalancer(), 1e-3), (EmdBalancer(), 1e-5)):
        q = balancer.plan(s)
        assert torch.isfinite(q).all() and (q >= 0).all()
        assert float((q.sum(1) * B - 1).abs().max()) < 1e-3
        assert float((q.sum(0) * K - 1).abs().max()) < tol, type(balancer).__name__
    paper = SinkhornBalancer().plan(s)
    assert torch.isfinite(paper).all() and float((paper.sum(1) * B - 1).abs().max()) < 1e-4


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), skew=st.sampled_from([0.0, 0.5, 5.0]))
def test_balanced_assignment_gives_floor_or_ceil_rows(shape, seed, skew):
    B, K = shape
    ids = balanced_assignment(scores_of(B, K, seed, skew))
    load = torch.bincount(ids, minlength=K)
    assert ids.shape == (B,) and int(load.sum()) == B
    assert set(load.tolist()) <= {B // K, -(-B // K)}
