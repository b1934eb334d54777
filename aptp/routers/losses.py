"""APTP's router losses: contrastive (prompt structure -> architecture structure), resource, spread.

Contrastive loss (the only loss training the predictor after warm-up), over a batch of B prompts::

    P_arch = softmax(cos(e_i, e_j) / tau)   # (B, B), rows; e = predicted architectures
    P_text = softmax(cos(z_i, z_j) / tau)   # (B, B), rows; z = prompt embeddings (constant)
    L = mean_ij [ BCE(P_arch_ij, P_text_ij) - BCE(P_text_ij, P_text_ij) ]
      = mean_ij [ t log(t / p) + (1 - t) log((1 - t) / (1 - p)) ]    p = P_arch_ij, t = P_text_ij

In APTP, e is what routing compares and the original code feeds this loss: the hard
(straight-through) gates weighted by 1/sqrt(group size) (:meth:`aptp.routers.ot.OTRouter.normalised_gates`),
not the predictor's raw logits.

i.e. the paper's element-wise binary cross-entropy between the two similarity distributions
minus the (constant) binary entropy of the target: a sum of Bernoulli KL divergences. Its
gradient equals the BCE's; it is zero exactly when P_arch == P_text, where the loss is 0 too
(the plain BCE has the same gradient but a non-zero floor). tau = 0.03, weight 100 in the paper.
Under torch.distributed the columns span the global batch: e is gathered keeping the gradient
of the local rows (:func:`aptp.routers.distributed.all_gather_rows`), z is gathered as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aptp.core.errors import ShapeError
from aptp.routers.distributed import all_gather_rows

_MASKED = -1e4  # similarity / tau of masked (diagonal) pairs: exp() is exactly 0 in float32


def _cosine_logits(rows: torch.Tensor, cols: torch.Tensor, tau: float) -> torch.Tensor:
    return F.normalize(rows, dim=-1, eps=1e-8) @ F.normalize(cols, dim=-1, eps=1e-8).T / tau  # (b, N)


def contrastive_loss(e: torch.Tensor, z: torch.Tensor, tau: float = 0.03, mask_diagonal: bool = False,
                     gather: bool = True) -> torch.Tensor:
    """Bernoulli-KL form of APTP's contrastive loss (see the module doc), a scalar.

    e: architecture vectors (B, U) (gradient flows here; APTP passes the group-normalised hard
    gates); z: prompt embeddings (B, D) (constant).
    ``mask_diagonal`` drops the self-pairs (always the most similar) from both distributions.
    ``gather`` uses the global batch when torch.distributed is initialised.
    """
    if e.dim() != 2 or z.dim() != 2 or e.shape[0] != z.shape[0] or e.shape[0] < 2:
        raise ShapeError(
            f"contrastive_loss needs e (B, U) and z (B, D) with the same B >= 2, got {tuple(e.shape)} "
            f"and {tuple(z.shape)}."
        )
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0 (the paper uses 0.03).")
    e_all, offset = all_gather_rows(e, keep_grad=True) if gather else (e, 0)  # (N, U)
    z_all, _ = all_gather_rows(z.detach(), keep_grad=False) if gather else (z.detach(), 0)  # (N, D)
    s_arch = _cosine_logits(e, e_all, tau)  # (B, N)
    s_text = _cosine_logits(z.detach().to(e.dtype), z_all.to(e.dtype), tau)  # (B, N)
    if mask_diagonal:
        eye = torch.zeros_like(s_arch, dtype=torch.bool)
        eye[torch.arange(e.shape[0]), offset + torch.arange(e.shape[0])] = True
        s_arch, s_text = s_arch.masked_fill(eye, _MASKED), s_text.masked_fill(eye, _MASKED)
    tiny = torch.finfo(s_arch.dtype).tiny
    log_p = torch.log_softmax(s_arch, dim=-1)  # log P_arch
    log_1mp = torch.log((-torch.expm1(log_p)).clamp_min(tiny))  # log(1 - P_arch)
    t = torch.softmax(s_text, dim=-1)  # P_text (constant)
    kl = torch.xlogy(t, t) - t * log_p + torch.xlogy(1 - t, 1 - t) - (1 - t) * log_1mp  # (B, N)
    return kl.mean()


def resource_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """``|log(mean(r) / p)|``: batch-mean kept-MACs ratio r (B,) vs the target ratio p, a scalar."""
    if not 0 < target <= 1:
        raise ValueError(f"target ratio p={target} must lie in (0, 1] (the paper: 0.6 of the model's MACs).")
    if ratio.numel() == 0:
        raise ShapeError("resource_loss got no ratios; pass the kept-MACs ratio of each sample, shape (B,).")
    return torch.log(ratio.mean() / target).abs()


def spread_losses(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread terms over the experts' (or samples') ratios r (K,): ``(-std(r), 1 - max(r))``.

    The first favours diverse expert sizes, the second one large expert (weights 0.1 in the paper).
    ``std`` is the population standard deviation (0 for a single value, never NaN).
    """
    if ratio.numel() == 0:
        raise ShapeError("spread_losses got no ratios; pass one kept-MACs ratio per expert, shape (K,).")
    return -ratio.std(correction=0), 1 - ratio.max()
