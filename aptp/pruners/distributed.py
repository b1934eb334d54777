"""What N training processes need to compute what one process computes on the whole batch.

* Every process draws the **global** batch (:func:`global_batch_indices`) and its noise from the
  same seeded stream (:func:`step_generator`), then keeps its own contiguous rows
  (:func:`local_rows`); so the split over processes changes no sample.
* Every loss is a global mean (each process sums its rows and divides by the global batch), so the
  gradients are **summed** across processes (:func:`sum_gradients`), never averaged.
* The collectives themselves (all-gather with the local gradient, all-reduce, a global
  logsumexp) live in :mod:`aptp.routers.distributed`, which the balancers share; they are
  re-exported here so a procedure imports one module.

Every helper is a no-op (or the identity) in a single process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from aptp.routers.distributed import all_gather_rows, all_reduce_sum, is_distributed, rank, world_size

__all__ = ["all_gather_rows", "all_reduce_sum", "barrier", "global_batch_indices", "is_distributed",
           "local_rows", "rank", "step_generator", "sum_gradients", "world_size"]


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of global batch ``step`` (B,): epochs of seeded permutations, same on every process."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n >= batch_size:
        return perm[pos * batch_size:(pos + 1) * batch_size]
    return perm[torch.arange(batch_size) % n]


def local_rows(batch_size: int) -> slice:
    """This process's contiguous share of a global batch of ``batch_size`` rows."""
    w, r = world_size(), rank()
    per = math.ceil(batch_size / w)
    return slice(min(r * per, batch_size), min((r + 1) * per, batch_size))


def step_generator(seed: int, step: int, salt: str) -> torch.Generator:
    """A generator seeded by (run seed, step, salt) only: the same stream on every process and
    after a resume, independent of the global random state."""
    h = int(hashlib.sha256(f"{seed}/{step}/{salt}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(h)


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (sum, in place) the gradients of ``params`` across processes: every loss is
    already a global mean, so the sum is the gradient of the global batch."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if is_distributed():
        dist.barrier()
