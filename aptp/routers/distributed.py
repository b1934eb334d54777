"""Collectives the router needs under ``torch.distributed`` (no-ops in a single process).

Balancers reduce their sums across processes as SwAV does, so a plan balances the *global* batch;
the contrastive loss gathers embeddings (keeping the gradient of the local part) so its similarity
matrices span the global batch. Every helper works on CPU (gloo) and GPU (nccl) process groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes (in place on a copy; no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``x`` over processes (no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` along ``dim`` where ``dim`` is split across processes (the batch dimension).

    Stable: the maximum is all-reduced first, then the sum of ``exp(x - max)``.
    """
    if not is_distributed():
        return torch.logsumexp(x, dim=dim, keepdim=True)
    m = all_reduce_max(x.amax(dim=dim, keepdim=True))  # global max
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_sum(torch.exp(x - m).sum(dim=dim, keepdim=True))
    return torch.log(s) + m


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def all_gather_rows(x: torch.Tensor, keep_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate every process's ``x`` (B_r, ...) along dim 0 -> ((sum_r B_r, ...), offset).

    ``offset`` is where this process's rows start in the result. With ``keep_grad`` the local
    rows are ``x`` itself, so gradients flow to the local part (the remote parts are constants:
    each process back-propagates its own rows, as in SimCLR/CLIP-style global batches).
    Processes may hold different numbers of rows.
    """
    if not is_distributed():
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    n_max = max(sizes)
    padded = x.detach()
    if x.shape[0] < n_max:
        pad = torch.zeros((n_max - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded = torch.cat([padded, pad])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:n] for p, n in zip(parts, sizes)]
    r = rank()
    if keep_grad:
        parts[r] = x
    return torch.cat(parts), sum(sizes[:r])
