"""Honest latency: every candidate timed in the same rounds, on a quiet clock.

On a shared CPU, wall time measures the neighbours as much as the model. So on CPU each call runs
with ``threads`` torch threads (default 1) and is timed by the calling thread's CPU time
(``time.thread_time``: with one torch thread the work runs in the calling thread, and time spent
waiting for a core is not counted); on CUDA by CUDA events after warm-up. Candidates are
interleaved: every round calls each candidate ``repeats`` times, in an order rotated from round to
round, so a slow phase of the machine hits every candidate alike. Report the median and the
interquartile range, and prefer ratios of medians to absolute times.

    timings = time_interleaved({"dense": lambda: unet(x, t, c), "expert": lambda: expert(x, t, c)})
    timings["expert"].median / timings["dense"].median
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Timing", "time_interleaved", "torch_threads"]


@dataclass
class Timing:
    """Per-call times (ms) of one candidate over all rounds."""

    label: str
    samples_ms: list[float] = field(default_factory=list)
    clock: str = "thread_time"

    @property
    def median(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p25(self) -> float:
        return float(np.quantile(self.samples_ms, 0.25))

    @property
    def p75(self) -> float:
        return float(np.quantile(self.samples_ms, 0.75))

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": round(self.median, 4), "p25_ms": round(self.p25, 4), "p75_ms": round(self.p75, 4),
                "calls": len(self.samples_ms), "clock": self.clock}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(candidates: Mapping[str, Callable[[], Any]], *, rounds: int = 10, repeats: int = 3,
                     warmup: int = 1, device: str | torch.device = "cpu", threads: int = 1) -> dict[str, Timing]:
    """Time every candidate (a zero-argument callable) in ``rounds`` interleaved rounds of
    ``repeats`` calls each, after ``warmup`` untimed calls; CPU: thread CPU time with ``threads``
    torch threads; CUDA: CUDA events."""
    if rounds < 1 or repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"rounds={rounds}, repeats={repeats} and threads={threads} must be >= 1, warmup >= 0.")
    if not candidates:
        raise ValueError("time_interleaved needs at least one candidate.")
    cuda = torch.device(device).type == "cuda"
    labels = list(candidates)
    out = {k: Timing(k, clock="cuda_events" if cuda else "thread_time") for k in labels}
    with torch_threads(threads), torch.no_grad():
        for k in labels:
            for _ in range(warmup):
                candidates[k]()
        if cuda:
            torch.cuda.synchronize()
        for r in range(rounds):
            order = labels[r % len(labels):] + labels[: r % len(labels)]  # rotate: no fixed position
            for k in order:
                fn = candidates[k]
                for _ in range(repeats):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        fn()
                        end.record()
                        torch.cuda.synchronize()
                        out[k].samples_ms.append(float(start.elapsed_time(end)))
                    else:
                        t0 = time.thread_time()
                        fn()
                        out[k].samples_ms.append((time.thread_time() - t0) * 1000.0)
    return out
