"""The task losses shared by phase 1 and phase 2 (issue 15: block distillation averaged over blocks)."""

import pytest
import torch

from aptp.pruners import objectives as O


def _features(n_blocks, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, 4, 4, generator=g) for _ in range(n_blocks)]


def test_block_distillation_is_the_mean_over_blocks_not_the_sum():
    s, t = _features(3, seed=0), _features(3, seed=1)
    per_block = torch.stack([((a - b) ** 2).flatten(1).mean(1) for a, b in zip(s, t)])  # (blocks, B)
    torch.testing.assert_close(O.block_distillation_per_sample(s, t), per_block.mean(0))
    # repeating every block leaves the mean unchanged (a sum would double it)
    torch.testing.assert_close(O.block_distillation_per_sample(s + s, t + t), O.block_distillation_per_sample(s, t))


def test_block_distillation_needs_matching_blocks():
    with pytest.raises(ValueError, match="as many student as teacher"):
        O.block_distillation_per_sample(_features(2), _features(3))
    with pytest.raises(ValueError, match="as many student as teacher"):
        O.block_distillation_per_sample([], [])


def test_task_losses_are_global_batch_means():
    g = torch.Generator().manual_seed(0)
    pred, teacher, target = (torch.randn(4, 2, 4, 4, generator=g) for _ in range(3))
    w = torch.rand(4, generator=g)
    f_s, f_t = _features(3, b=4, seed=2), _features(3, b=4, seed=3)
    task = O.task_losses(pred, teacher, target, w, f_s, f_t)
    torch.testing.assert_close(task.denoise, (O.per_sample_mse(pred, target) * w).mean())
    torch.testing.assert_close(task.distill, O.per_sample_mse(pred, teacher).mean())
    torch.testing.assert_close(task.block, O.block_distillation_per_sample(f_s, f_t).mean())
    # two processes' halves over the global batch sum to the whole batch's losses
    halves = [O.task_losses(pred[r], teacher[r], target[r], w[r], [f[r] for f in f_s], [f[r] for f in f_t],
                            global_batch=4) for r in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(halves[0].stacked() + halves[1].stacked(), task.stacked())
    torch.testing.assert_close(task.weighted(1.0, 0.2, 0.5), task.denoise + 0.2 * task.distill + 0.5 * task.block)
