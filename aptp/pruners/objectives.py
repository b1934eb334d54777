"""Task losses shared by the pruning procedures: denoising (weighted per sample by the backbone's
``loss_weights``, Min-SNR), output distillation and block-feature distillation from the dense teacher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, (B, ...) x2 -> (B,)."""
    return F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(dim=1)


def block_distillation_per_sample(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Block-feature distillation per sample, (B,): the MSE between student and teacher block
    outputs, **averaged over the blocks** (the original sums the per-block MSEs and divides by the
    number of blocks; summed, the term grows with the number of blocks and drowns the others)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need as many student as teacher block features (>0), got {len(student)} and {len(teacher)}.")
    return torch.stack([per_sample_mse(s, t) for s, t in zip(student, teacher)]).mean(dim=0)


@dataclass
class TaskLosses:
    """The task losses of a gated or cut student against the dense teacher, each a scalar."""

    denoise: torch.Tensor  # Min-SNR-weighted denoising loss
    distill: torch.Tensor  # output distillation
    block: torch.Tensor  # block-feature distillation, averaged over the blocks

    def weighted(self, denoise: float, distill: float, block: float) -> torch.Tensor:
        return denoise * self.denoise + distill * self.distill + block * self.block

    def stacked(self) -> torch.Tensor:
        """(3,) detached: denoise, distill, block."""
        return torch.stack([self.denoise, self.distill, self.block]).detach()


def task_losses(pred: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, snr_weight: torch.Tensor,
                student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                global_batch: int | None = None) -> TaskLosses:
    """Denoising, output and block-feature distillation of one batch, shared by phase 1 (the gated
    model) and phase 2 (a cut expert) so both assemble the loss the same way.

    pred, teacher, target: (b, ...); snr_weight: (b,); features: one (b, ...) tensor per block.
    Every term is a sum over this process's b rows divided by ``global_batch`` (default b): summed
    over processes, that is the global batch mean.
    """
    n = pred.shape[0] if global_batch is None else global_batch
    return TaskLosses(
        denoise=(per_sample_mse(pred, target) * snr_weight).sum() / n,
        distill=per_sample_mse(pred, teacher).sum() / n,
        block=block_distillation_per_sample(student_features, teacher_features).sum() / n,
    )


class FeatureRecorder:
    """Records the outputs of ``modules`` during a forward (forward hooks), in module order."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.features: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args, output) -> None:
        self.features.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.features = self.features, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
