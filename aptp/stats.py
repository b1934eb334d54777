"""Intervals for comparisons: bootstrap means and paired differences over prompts.

A comparison scores every model on the same held-out prompts with the same initial noise, so the
models' per-prompt scores are *paired*. The unit of resampling is the prompt (its score is the mean
over the sampling seeds): prompts are drawn with replacement, within their kind when kinds are
given (a stratified bootstrap keeps the kind mix of the evaluation set), and the statistic is
recomputed on every resample; the interval is the percentile interval.

    a = per_prompt_scores(rows, "aptp")          # (N,) mean over seeds, prompt order
    d = paired_difference(a, b, strata=kinds)    # Interval of mean(a - b)
    verdict(d, higher_is_better=True)            # "better" / "worse" / "no significant difference"

"better" is said only when the whole interval lies on one side of zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "verdict", "spread"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval: ``estimate`` in [``low``, ``high``]."""

    estimate: float
    low: float
    high: float
    n: int  # prompts (resampling units)
    confidence: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _resample_indices(n: int, strata: Sequence[object] | None, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement (within each stratum when strata are given)."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    labels = np.asarray([str(s) for s in strata])
    if labels.shape[0] != n:
        raise ValueError(f"got {labels.shape[0]} strata labels for {n} values; pass one label per value.")
    parts = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        parts.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
    return np.concatenate(parts, axis=1)


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, strata: Sequence[object] | None = None,
                   n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` (N,) with its percentile-bootstrap interval (resampling the N values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-d sequence, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean got NaN or infinite values; drop prompts the metric does not apply to.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a {confidence:.0%} interval; use >= 1000.")
    idx = _resample_indices(x.size, strata, n_boot, np.random.default_rng(seed))
    means = x[idx].mean(axis=1)  # (n_boot,)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(x.mean()), float(low), float(high), int(x.size), confidence)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      strata: Sequence[object] | None = None, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> Interval:
    """mean(a - b) over paired values (the same prompts, the same noise) with its bootstrap interval.

    Identical inputs give exactly 0 with the interval [0, 0]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}.")
    return bootstrap_mean(a - b, strata=strata, n_boot=n_boot, confidence=confidence, seed=seed)


def verdict(difference: Interval, higher_is_better: bool = True) -> str:
    """"better" / "worse" (for the first model of the pair) only when the interval excludes zero."""
    if not difference.excludes_zero():
        return "no significant difference"
    return "better" if (difference.estimate > 0) == higher_is_better else "worse"


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / max / standard deviation of a few repeats (e.g. one value per training seed)."""
    x = np.asarray(values, dtype=np.float64)
    return {"min": float(x.min()), "max": float(x.max()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "n": int(x.size)}
