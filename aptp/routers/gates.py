"""Logits -> gates: Gumbel-sigmoid with a straight-through hard threshold, and monotone depth.

``g = sigmoid((logit + noise + offset) / tau)`` with logistic noise ``log u - log(1 - u)`` (the
difference of two Gumbel samples: the binary Concrete / Gumbel-sigmoid), offset 3 and tau 0.4 in
the paper. The hard gate is ``1[g >= 0.5]`` = ``1[logit + noise + offset >= 0]``; with
``hard=True`` its forward value is the hard gate and its gradient the soft gate's
(straight-through). Without noise the gates are deterministic (inference).

Depth: a depth group of n blocks listed in drop-priority order (block 0 is dropped first) has
n + 1 raw logits ``a`` (B, n + 1): ``p = softmax(a)`` is a distribution over d, the number of
blocks dropped, and block i is kept iff d <= i, so ``keep_i = cumsum(p)_i`` (equivalently
``1 - reversed cumsum`` of the tail). keep_0 <= keep_1 <= ... <= keep_{n-1}: blocks drop in their
fixed priority order. Its logit ``log keep_i - log(1 - keep_i)`` enters the same Gumbel-sigmoid,
with one noise sample shared by the whole group, so even noisy hard gates stay monotone.
"""

from __future__ import annotations

import torch


def logistic_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of log u - log(1 - u), u ~ U(0, 1): the difference of two Gumbel(0, 1) samples."""
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    u = u.clamp(torch.finfo(like.dtype).tiny, 1 - torch.finfo(like.dtype).eps)
    return torch.log(u) - torch.log1p(-u)


class _StraightThrough(torch.autograd.Function):
    """Exactly 0/1 forward (``hard + soft - soft.detach()`` is not, in floating point); identity backward."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, threshold: float) -> torch.Tensor:  # noqa: ANN001
        return (soft >= threshold).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


def straight_through(soft: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Forward: ``1[soft >= threshold]`` exactly; backward: the gradient of ``soft``."""
    return _StraightThrough.apply(soft, threshold)


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 0.4, offset: float = 3.0, noise: bool = False,
                   hard: bool = True, noise_sample: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Gates in [0, 1] (soft) or {0, 1} with straight-through gradients (hard), same shape as logits.

    ``noise_sample`` (broadcastable to ``logits``) replaces the freshly drawn noise, e.g. one
    sample shared by a depth group; it is used only when ``noise`` is True.
    """
    x = logits + offset
    if noise:
        x = x + (noise_sample if noise_sample is not None else logistic_noise(logits.shape, logits, generator))
    g = torch.sigmoid(x / tau)  # soft gate
    return straight_through(g) if hard else g


def monotone_depth_logits(raw: torch.Tensor) -> torch.Tensor:
    """Raw depth logits (..., n + 1) -> logits (..., n) of the monotone keep probabilities.

    ``keep_i = sum_{j <= i} softmax(raw)_j``; returns ``log keep_i - log(1 - keep_i)`` computed in
    the log domain (finite for any raw values).
    """
    log_p = torch.log_softmax(raw, dim=-1)  # (..., n + 1)
    log_keep = torch.logcumsumexp(log_p, dim=-1)[..., :-1]  # log P(d <= i), (..., n)
    log_drop = torch.logcumsumexp(log_p.flip(-1), dim=-1).flip(-1)[..., 1:]  # log P(d > i), (..., n)
    return log_keep - log_drop
