"""Balancers: routing scores (B, K) -> a transport plan (B, K) whose marginals are balanced.

A plan ``q`` has rows summing to 1/B (every prompt is routed) and columns summing to 1/K (every
expert receives B/K prompts), so taking each row's argmax keeps every expert in use (no collapse).
All balancers run under ``no_grad`` and, when ``torch.distributed`` is initialised, balance the
*global* batch: ``sinkhorn`` all-reduces its sums (SwAV), ``pot`` and ``emd`` gather the scores,
solve the global problem and keep their own rows.

* ``sinkhorn`` - fixed-iteration Sinkhorn-Knopp as in the paper (eps = 0.05, 3 iterations),
  computed in the log domain (same iterates as SwAV's, without overflow for any score scale).
* ``pot``      - POT's log-domain Sinkhorn run to a tolerance (``stopThr`` 1e-6 converges in fp32).
* ``emd``      - POT's exact optimal transport (network simplex, ``ot.emd``) in float64.
* ``greedy``   - no balancing (the ablation): the plan is the one-hot argmax / B.

Hard assignment (:meth:`assign`): ``rounding="argmax"`` is the paper's argmax of the plan;
``rounding="balanced"`` (default) gives every expert floor(B/K) or ceil(B/K) rows, filling experts
greedily by plan value (:func:`balanced_assignment`). It equals the argmax whenever the argmax
already gives every expert floor or ceil of B/K rows, and fixes what argmax does on skewed or tied
scores (all prompts identical, or all codes equal at initialisation: argmax sends every row to
expert 0). Under torch.distributed the global plan is rounded (each process keeps its rows), so N
processes assign exactly as one process does on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import ot
import torch

from aptp.core.errors import ShapeError
from aptp.core.interfaces import Balancer
from aptp.routers import distributed as D

ROUNDINGS = ("balanced", "argmax")


# ----------------------------------------------------------------------------------- helpers
def check_scores(scores: torch.Tensor) -> None:
    """Raise ShapeError unless ``scores`` is a finite floating (B, K) matrix with B, K >= 1."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ShapeError(f"scores must be a (B, K) tensor with B >= 1 prompts and K >= 1 experts, got {shape}.")
    if not scores.is_floating_point():
        raise ShapeError(f"scores must be floating point, got {scores.dtype}; pass scores.float().")
    if not bool(torch.isfinite(scores).all()):
        raise ShapeError(
            "scores contain NaN or infinite values; replace -inf by a finite score lower than any other "
            "(e.g. scores.min() - 1) and check the router for NaNs."
        )


def balanced_assignment(plan: torch.Tensor) -> torch.Tensor:
    """Rows -> columns with every column taking floor(B/K) or ceil(B/K) rows, (B,) long.

    Two stages of proposal rounds: first every column takes up to q = floor(B/K) rows, then the
    r = B - qK rows left over take one extra slot each in distinct columns. In a round, every
    unassigned row proposes to its best open column (by plan value) and each column accepts its
    best proposals up to its remaining room. When the row-wise argmax already gives every column
    q or q + 1 rows, the result *is* that argmax. Vectorised rounds, at most K per stage.
    """
    B, K = plan.shape
    ids = torch.full((B,), -1, dtype=torch.long, device=plan.device)
    rows = torch.arange(B, device=plan.device)  # unassigned rows
    q = B // K
    if q > 0:
        rows = _fill(plan, rows, ids, torch.full((K,), q, dtype=torch.long, device=plan.device))
    if rows.numel():  # the r = B - qK rows left: at most one more per column
        rows = _fill(plan, rows, ids, torch.ones(K, dtype=torch.long, device=plan.device))
    assert rows.numel() == 0 and bool((ids >= 0).all())
    return ids


def _fill(plan: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Proposal rounds until ``rows`` are assigned or every column is full; returns rows left."""
    K = plan.shape[1]
    while rows.numel() and bool((room > 0).any()):
        p = plan[rows].masked_fill((room <= 0)[None, :], -math.inf)  # (b, K), full columns out
        value, best = p.max(dim=1)  # (b,), (b,)
        o1 = torch.argsort(value, descending=True, stable=True)
        order = o1[torch.argsort(best[o1], stable=True)]  # grouped by column, best value first
        col = best[order]
        counts = torch.bincount(col, minlength=K)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_col = torch.arange(order.numel(), device=plan.device) - starts[col]
        accept = rank_in_col < room[col]
        ids[rows[order[accept]]] = col[accept]
        room -= torch.bincount(col[accept], minlength=K)
        rows = rows[order[~accept]]
    return rows


def _global_rows(scores: torch.Tensor) -> float:
    """B summed over processes (a tensor on the scores' device: NCCL reduces only GPU tensors)."""
    return D.all_reduce_sum(torch.tensor(float(scores.shape[0]), dtype=torch.float64, device=scores.device)).item()


def _uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not one of {ROUNDINGS}; use 'balanced' or 'argmax'.")


class _Rounded(Balancer):
    """Shared :meth:`assign`: the configured rounding of :meth:`plan`."""

    def assign(self, scores: torch.Tensor) -> torch.Tensor:
        q = self.plan(scores)  # (b, K) this process's rows of the global plan
        if getattr(self.config, "rounding", "argmax") == "balanced":
            # Round the global plan, keep the local rows: N processes assign as one would.
            q_all, offset = D.all_gather_rows(q, keep_grad=False)  # (B, K)
            return balanced_assignment(q_all)[offset:offset + q.shape[0]]
        return q.argmax(dim=-1)


# ---------------------------------------------------------------------------------- sinkhorn
@dataclass
class SinkhornConfig:
    """Fixed-iteration Sinkhorn-Knopp (SwAV / the paper).

    ``rounding`` turns the plan into one expert per prompt: ``"argmax"`` is the paper's (each
    prompt takes the argmax of its row of the plan); ``"balanced"`` (the default) gives every
    expert floor(B/K) or ceil(B/K) prompts. The default stays ``balanced`` because the paper's
    argmax collapses when the codes tie, as they do at the paper's orthogonal initialisation (every
    code starts fully kept): measured on the ``smoke`` experiment (K=4, B=8, orthogonal init),
    argmax sent all 8 prompts to code 0 on every step after warm-up, while balanced gave 2 each.
    With codes that start apart (``world``: ``init_codes: kmeans``, 120 steps) argmax works: loads
    between 1 and 5 of 8 per step, no code starved, mean ratio 0.596, codes 0.64/0.61/0.54/0.65
    (balanced: 0.66/0.52/0.53/0.69). Balanced rounding gives every code the same share of the
    resource gradient on every step; argmax lets the loads follow the plan.
    """

    eps: float = 0.05  # entropic regularisation: q ~ exp(scores / eps)
    iterations: int = 3  # Sinkhorn-Knopp iterations (the paper: 3); the minimum with a tolerance
    tolerance: Optional[float] = None  # None: exactly `iterations`; else iterate until every column
    #                                    sum is within tolerance of 1/K (relative), at most max_iterations
    max_iterations: int = 1000
    rounding: str = "balanced"  # hard assignment: "balanced" or "argmax" (the paper)

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps={self.eps} must be a finite number > 0 (the paper uses 0.05).")
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1 (the paper uses 3).")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance={self.tolerance} must be > 0 (e.g. 1e-3) or None for fixed iterations.")
        if self.max_iterations < self.iterations:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= iterations={self.iterations}.")
        _check_rounding(self.rounding)


class SinkhornBalancer(_Rounded):
    """Fixed-iteration Sinkhorn-Knopp (paper: eps 0.05, 3 iterations), all-reduced across processes."""

    config_class = SinkhornConfig

    @torch.no_grad()
    def plan(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        K = scores.shape[1]
        B = _global_rows(scores)  # global B
        log_q = scores.to(torch.float32) / self.config.eps  # (B, K), log of exp(scores / eps)
        log_q = log_q - D.global_logsumexp(log_q.logsumexp(dim=1, keepdim=True), dim=0)  # total mass 1
        cfg = self.config
        n_max = cfg.iterations if cfg.tolerance is None else cfg.max_iterations
        for it in range(n_max):
            # columns (experts) -> 1/K: their sums run over the global batch, hence all-reduced
            log_q = log_q - D.global_logsumexp(log_q, dim=0) - math.log(K)
            # rows (prompts) -> 1/B: local
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(B)
            if cfg.tolerance is not None and it + 1 >= cfg.iterations:
                col = torch.exp(D.global_logsumexp(log_q, dim=0) + math.log(K))  # (1, K), target 1
                if float((col - 1).abs().max()) < cfg.tolerance:  # same decision on every process
                    break
        return torch.exp(log_q).to(scores.dtype)  # (B, K), rows exactly 1/B, columns ~1/K


# --------------------------------------------------------------------------------------- POT
@dataclass
class PotConfig:
    """POT's log-domain Sinkhorn run to a tolerance."""

    eps: float = 0.05  # entropic regularisation (POT's ``reg``) on the cost -scores
    stop_threshold: float = 1e-6  # POT ``stopThr``; 1e-9 (POT's default) never converges in float32
    max_iterations: int = 1000  # POT ``numItermax``
    rounding: str = "balanced"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0 (e.g. 0.05).")
        if not self.stop_threshold > 0:
            raise ValueError(f"stop_threshold={self.stop_threshold} must be > 0 (1e-6 converges in float32).")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= 1.")
        _check_rounding(self.rounding)


class PotSinkhornBalancer(_Rounded):
    """POT log-domain Sinkhorn (``ot.sinkhorn(method='sinkhorn_log')``) to tolerance 1e-6."""

    config_class = PotConfig

    @torch.no_grad()
    def plan(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        all_scores, offset = D.all_gather_rows(scores.to(torch.float32), keep_grad=False)  # (B_glob, K)
        Bg, K = all_scores.shape
        M = -all_scores  # cost (B_glob, K)
        q = ot.sinkhorn(_uniform(Bg, M), _uniform(K, M), M, self.config.eps, method="sinkhorn_log",
                        numItermax=self.config.max_iterations, stopThr=self.config.stop_threshold, warn=False)
        return q[offset:offset + scores.shape[0]].to(scores.dtype)  # local rows (B, K)


# --------------------------------------------------------------------------------------- EMD
@dataclass
class EmdConfig:
    """POT's exact optimal transport (network simplex)."""

    max_iterations: int = 100000  # POT ``numItermax``
    rounding: str = "balanced"

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= 1.")
        _check_rounding(self.rounding)


class EmdBalancer(_Rounded):
    """Exact optimal transport with POT's ``ot.emd`` (float64): a vertex of the balanced polytope."""

    config_class = EmdConfig

    @torch.no_grad()
    def plan(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        all_scores, offset = D.all_gather_rows(scores.to(torch.float64), keep_grad=False)  # (B_glob, K)
        Bg, K = all_scores.shape
        M = -all_scores  # cost (B_glob, K)
        q = ot.emd(_uniform(Bg, M), _uniform(K, M), M, numItermax=self.config.max_iterations)
        return q[offset:offset + scores.shape[0]].to(scores.dtype)  # local rows (B, K)


# ------------------------------------------------------------------------------------ greedy
@dataclass
class GreedyConfig:
    """No parameters: the no-balancing ablation."""


class GreedyBalancer(Balancer):
    """No balancing (ablation): each prompt takes its best-scoring expert; plan = one-hot / B."""

    config_class = GreedyConfig

    @torch.no_grad()
    def plan(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        B = _global_rows(scores)  # global B
        onehot = torch.nn.functional.one_hot(scores.argmax(dim=-1), scores.shape[1])  # (B, K)
        return onehot.to(scores.dtype) / B  # rows 1/B; columns follow the argmax (unbalanced)

    def assign(self, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return scores.argmax(dim=-1)
