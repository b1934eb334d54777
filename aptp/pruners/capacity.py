"""Capacity-aware code budgets: give the codes whose prompts suffer most from pruning more of the budget.

An option of APTP's phase 1 (``pruner.code_budget: sensitivity``; the paper's ``uniform`` is the
default). The paper's resource term ``|log(mean r / p)|`` prices only the batch mean, so under
balanced routing every code receives the same resource gradient and the codes shrink in lockstep,
whichever prompts they serve. Here, once, right after warm-up:

1. **Measure** (:func:`measure_sensitivity`). Route a fixed sample of training prompts to the
   freshly initialised codes (groups G_k, loads n_k = |G_k|). For each code k and each of three
   budgets rho_j in {p - d, p, p + d} (p the target, d the spread), the mean output-distillation
   error of the student under one uniformly pruned architecture ``uniform_architecture(rho_j)``
   on G_k's prompts::

       e_kj = mean_{i in G_k} || f(x_i | arch(rho_j)) - f(x_i) ||^2 / |x|     # (K, 3)

   with fixed noise and timesteps (seeded by the run seed), no gradient: the same numbers on every
   run and every resume.

2. **Allocate** (:func:`allocate_targets`). Fit ``e_k(rho) = a_k exp(-b_k rho)`` per code (least
   squares on ``log e``; ``b_k >= eps``), then solve::

       min_p  sum_k n_k a_k exp(-b_k p_k)
       s.t.   sum_k n_k p_k = p sum_k n_k,     |p_k - p| <= d

   a convex problem (each term is convex in p_k) whose KKT conditions are
   ``a_k b_k exp(-b_k p_k) = lambda`` on the codes strictly inside the box, i.e.
   ``p_k(lambda) = clip(log(a_k b_k / lambda) / b_k, p - d, p + d)``, decreasing in lambda;
   bisection on log lambda meets the budget.

3. **Train** (:func:`code_resource_loss`): phase 1 adds ``sum_k (n_k / B) |log(rbar_k / p_k)|``
   (rbar_k: mean ratio of the batch rows routed to code k) to the paper's global resource term,
   which stays, so the deployed mean budget still holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from aptp.core.errors import ShapeError
from aptp.pruners import objectives as O
from aptp.pruners.gating import uniform_architecture
from aptp.pruners import distributed as D
from aptp.pruners.distributed import local_rows

CODE_BUDGETS = ("uniform", "sensitivity")
MIN_SLOPE = 1e-3  # b_k floor: a flat or rising error curve gets (almost) no marginal gain
_STEP_BASE = -3_000_000  # ctx.batch step ids of the measurement (training uses >= 0, phase 2 others)


def check_code_budget(name: str) -> str:
    """``name`` if it is a code budget, else a one-line ValueError naming the choices."""
    if name not in CODE_BUDGETS:
        raise ValueError(f"code_budget={name!r} is unknown; use 'uniform' (the paper: one target for the "
                         "batch mean) or 'sensitivity' (per-code targets from measured pruning sensitivity).")
    return name


def measurement_ratios(target: float, spread: float) -> list[float]:
    """The three budgets measured, ``[p - d, p, p + d]`` kept inside (0, 1]."""
    return [min(1.0, max(0.01, target + s * spread)) for s in (-1, 0, 1)]


@torch.no_grad()
def measure_sensitivity(ctx, groups: Sequence[torch.Tensor], ratios: Sequence[float], batch_size: int = 16,
                        ratio_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean output-distillation error of each code's prompts under uniform pruning, and the ratios measured.

    ctx: a :class:`~aptp.pruners.training.TrainContext`; groups: K tensors of dataset rows (the
    prompts routed to each code; an empty group gets NaN errors); ratios: the J budgets rho_j asked
    of :func:`~aptp.pruners.gating.uniform_architecture`; ``ratio_of`` (..., U) -> (...): the
    resource ratio of an architecture (default: kept MACs).

    Returns ``errors`` (K, J) float64 and ``measured`` (J,) float64, the resource ratios of the
    architectures actually evaluated (a unit space's granularity may not hit rho_j exactly).

    Every group is evaluated in chunks of ``batch_size`` rows (each row once), each chunk with noise
    and timesteps drawn from the run seed and a fixed step id (:meth:`TrainContext.batch`), the
    dense teacher once per chunk, then the gated student at every rho_j on the same inputs.
    Distributed: every process evaluates its rows of each chunk and the sums are all-reduced.
    """
    space = ctx.unit_space
    archs = torch.stack([uniform_architecture(space, float(rho)) for rho in ratios])  # (J, U)
    measure = ratio_of if ratio_of is not None else space.macs_ratio
    measured = measure(archs).detach().double().cpu()  # (J,)
    device = next(ctx.denoiser.parameters()).device
    archs = archs.to(device)
    errors = torch.full((len(groups), len(ratios)), float("nan"), dtype=torch.float64)  # (K, J)
    for k, members in enumerate(groups):
        members = members.long().cpu()
        sums = torch.zeros(len(ratios) + 1, dtype=torch.float64)  # per-rho error sums, then the row count
        for c, start in enumerate(range(0, len(members), batch_size)):
            pos = torch.arange(start, min(start + batch_size, len(members)))  # (b,) positions in members
            mine = local_rows(len(pos))
            if mine.start >= mine.stop:  # distributed: no row of this chunk on this process
                continue
            batch = ctx.batch(pos, _STEP_BASE - 10_000 * k - c, subset=members)
            ctx.gates.clear()
            ctx.features.take()
            teacher = ctx.backbone.denoise(ctx.denoiser, batch.x_t, batch.t, batch.text)  # (b, C, H, W)
            for j in range(len(ratios)):
                ctx.gates.set(archs[j])  # (U,) one architecture for every row
                student = ctx.backbone.denoise(ctx.denoiser, batch.x_t, batch.t, batch.text)
                sums[j] += O.per_sample_mse(student, teacher).double().sum().cpu()
            ctx.gates.clear()
            ctx.features.take()  # drop the recorded block features
            sums[-1] += len(batch.captions)
        sums = D.all_reduce_sum(sums.to(device)).cpu()
        if sums[-1] > 0:
            errors[k] = sums[:-1] / sums[-1]
    return errors, measured


def fit_exponential(errors: torch.Tensor, ratios: torch.Tensor, min_slope: float = MIN_SLOPE,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code fit ``e_k(rho) = a_k exp(-b_k rho)``: errors (K, J), ratios (J,) -> a (K,), b (K,).

    Least squares on ``log e = log a - b rho`` over the points with a finite positive error::

        b_k = -cov(rho, log e_k) / var(rho),   clamped to b_k >= min_slope
        log a_k = mean(log e_k + b_k rho)      (refit with the clamped slope)

    A code with fewer than two distinct usable ratios gets b_k = min_slope and a_k the mean of its
    usable errors (1 when none): a flat curve, the smallest marginal gain.
    """
    errors = torch.as_tensor(errors, dtype=torch.float64)
    ratios = torch.as_tensor(ratios, dtype=torch.float64)
    if errors.dim() != 2 or ratios.shape != (errors.shape[1],):
        raise ShapeError(f"need errors (K, J) and ratios (J,), got {tuple(errors.shape)} and {tuple(ratios.shape)}.")
    a = torch.ones(errors.shape[0], dtype=torch.float64)  # (K,)
    b = torch.full((errors.shape[0],), float(min_slope), dtype=torch.float64)  # (K,)
    for k in range(errors.shape[0]):
        ok = torch.isfinite(errors[k]) & (errors[k] > 0)
        x, y = ratios[ok], errors[k][ok].log()  # (j,)
        if len(x) == 0:
            continue
        if len(x) >= 2 and float(x.max() - x.min()) > 1e-9:
            xc = x - x.mean()
            b[k] = max(float(min_slope), float(-(xc * (y - y.mean())).sum() / (xc * xc).sum()))
            a[k] = math.exp(float((y + b[k] * x).mean()))
        else:
            a[k] = float(errors[k][ok].mean())
    return a, b


def allocate_targets(errors: torch.Tensor, ratios: torch.Tensor, loads: torch.Tensor, target: float,
                     spread: float, min_slope: float = MIN_SLOPE) -> torch.Tensor:
    """Per-code targets p (K,) minimising the load-weighted fitted error at the budget ``target``.

    errors (K, J) (J >= 2 budgets per code), ratios (J,), loads n (K,) >= 0. With a_k, b_k from
    :func:`fit_exponential`::

        min_p sum_k n_k a_k exp(-b_k p_k)   s.t.  sum_k n_k p_k = target * sum_k n_k,
                                                 lo <= p_k <= hi,  lo = max(target - spread, 1e-3),
                                                                   hi = min(target + spread, 1)

    Stationarity: ``a_k b_k exp(-b_k p_k) = lambda`` for every code strictly inside the box, so
    ``p_k(lambda) = clip(log(a_k b_k / lambda) / b_k, lo, hi)``; ``sum_k n_k p_k(lambda)`` falls
    monotonically with lambda and is solved by bisection on log lambda (float64, to machine
    precision). The budget is feasible since lo <= target <= hi. A code with no load does not enter
    the budget and gets ``target``; equal curves get equal targets; ``spread = 0`` gives every code
    ``target``. Returns float64 (K,).
    """
    errors = torch.as_tensor(errors, dtype=torch.float64)
    loads = torch.as_tensor(loads, dtype=torch.float64)
    if loads.shape != (errors.shape[0],):
        raise ShapeError(f"loads must have shape ({errors.shape[0]},) (one per code), got {tuple(loads.shape)}.")
    if not 0 < target <= 1:
        raise ValueError(f"target={target} must be in (0, 1].")
    if spread < 0:
        raise ValueError(f"spread={spread} must be >= 0.")
    if bool((loads < 0).any()):
        raise ValueError(f"loads must be >= 0, got {loads.tolist()}.")
    a, b = fit_exponential(errors, ratios, min_slope)  # (K,), (K,)
    lo, hi = max(target - spread, 1e-3), min(target + spread, 1.0)
    p = torch.full_like(a, float(target))  # (K,)
    used = loads > 0
    if spread == 0 or not bool(used.any()) or lo >= hi:
        return p
    n, a, b = loads[used], a[used], b[used]
    log_ab = (a * b).log()  # (k,) log of each code's marginal gain at p = 0

    def p_of(log_lam: float) -> torch.Tensor:
        return ((log_ab - log_lam) / b).clamp(lo, hi)  # (k,)

    budget = float(target) * float(n.sum())
    # log lambda where every code sits at hi (lower end) / at lo (upper end) of the box
    left, right = float((log_ab - b * hi).min()) - 1.0, float((log_ab - b * lo).max()) + 1.0
    for _ in range(200):
        mid = 0.5 * (left + right)
        if float((n * p_of(mid)).sum()) > budget:
            left = mid  # too much kept: raise lambda
        else:
            right = mid
    q = p_of(0.5 * (left + right))
    # the bisection's last residual (~1e-16) onto the codes strictly inside the box
    free = (q > lo) & (q < hi)
    if bool(free.any()):
        q = torch.where(free, q + (budget - float((n * q).sum())) / float(n[free].sum()), q)
    p[used] = q
    return p


def code_resource_loss(ratio: torch.Tensor, expert: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-code resource term ``sum_k (n_k / B) |log(rbar_k / p_k)|``, a scalar.

    ratio: each row's resource ratio r (B,) (straight-through, as the global term); expert: the code
    of each row (B,) in [0, K); targets: p (K,). rbar_k is the mean r of the rows routed to k; a code
    with no row in the batch adds nothing.
    """
    if ratio.dim() != 1 or expert.shape != ratio.shape:
        raise ShapeError(f"need ratio (B,) and expert (B,), got {tuple(ratio.shape)} and {tuple(expert.shape)}.")
    targets = targets.to(ratio)
    onehot = torch.nn.functional.one_hot(expert.long(), targets.shape[0]).to(ratio)  # (B, K)
    n = onehot.sum(0)  # (K,)
    rbar = (onehot.T @ ratio) / n.clamp(min=1)  # (K,)
    rbar = torch.where(n > 0, rbar, targets)  # empty codes: log(1) = 0
    return ((n / ratio.shape[0]) * torch.log(rbar / targets).abs()).sum()
