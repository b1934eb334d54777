"""Balancers and the contrastive loss under torch.distributed (2 CPU processes, gloo): the global
plan equals the single-process plan on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from routing_helpers import SPLIT, distributed_worker, skewed_scores

from aptp.routers.balancers import (
    EmdBalancer,
    GreedyBalancer,
    PotSinkhornBalancer,
    SinkhornBalancer,
    SinkhornConfig,
)
from aptp.routers.losses import contrastive_loss


@pytest.mark.distributed
def test_global_plan_matches_single_process_plan(tmp_path):
    B = sum(SPLIT)
    scores = skewed_scores(B, 8, seed=5)
    g = torch.Generator().manual_seed(0)
    e, z = torch.randn(B, 12, generator=g), torch.randn(B, 16, generator=g)
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), scores, e, z, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = {"sinkhorn": SinkhornBalancer(), "pot": PotSinkhornBalancer(), "emd": EmdBalancer(),
              "greedy": GreedyBalancer(), "sinkhorn-tol": SinkhornBalancer(SinkhornConfig(tolerance=1e-3))}
    for name, balancer in single.items():
        glob = torch.cat([p[name] for p in parts])  # (B, K) stitched from the two processes
        ref = balancer.plan(scores)
        assert glob.shape == ref.shape
        assert torch.allclose(glob, ref, atol=1e-6 / B, rtol=1e-4), f"{name}: global plan != single-process plan"
        assert abs(float(glob.sum()) - 1) < 1e-4
    # contrastive loss over the global batch: row-weighted mean of the local losses
    loss = sum(p["contrastive"] * n for p, n in zip(parts, SPLIT)) / B
    assert torch.allclose(loss, contrastive_loss(e, z, tau=0.1), rtol=1e-5)
    for p, n in zip(parts, SPLIT):
        grad = p["contrastive_grad"]
        assert grad.shape == (n, e.shape[1]) and torch.isfinite(grad).all() and float(grad.abs().max()) > 0
