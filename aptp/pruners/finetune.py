"""The one fine-tuning loop: APTP's phase 2 and the static pruner's ``finetune`` are this code.

For every expert k (its architecture a_k (U,) and the dataset rows routed to it):

    expert = ctx.cut(a_k)                                     # from the dense weights
    for step in range(steps):                                 # rows of k only, seeded per (k, step)
        L = ctx.task_loss(batch, (w_d, w_o, w_b), B, expert)  # the dense model is the teacher
        L.backward(); sum_gradients(...); opt.step()
    save experts/expert-k (+ finetune.json: distillation before / after on a fixed batch)

Checkpointed every ``checkpoint_every`` steps and at the end; a rerun resumes from the latest
checkpoint and skips experts already saved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from tqdm.auto import tqdm

from aptp.core import values
from aptp.core.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from aptp.core.errors import reading
from aptp.pruners.artefacts import JsonlLogger, finished_expert, save_finetuned_expert
from aptp.pruners.distributed import global_batch_indices, sum_gradients
from aptp.pruners.training import CutStudent, TrainContext


@dataclass
class Phase2Config:
    """How each expert is fine-tuned (APTP's ``pruner.phase2``; the static pruner's ``pruner.finetune``)."""

    KEY: ClassVar[str] = "phase2"  # the config key errors name (the static pruner's subclass: finetune)
    steps: int = 30_000  # fine-tuning steps per expert (split: per_expert), or in all (split: by_load)
    # "per_expert" (the paper: every expert gets `steps`) or "by_load": `steps` is the total, shared
    # out by each expert's routed training load, so a K-expert run costs what one static model costs
    split: str = "per_expert"
    batch_size: int = 64
    lr: float = 1e-5  # times sqrt(global batch) when scale_lr
    denoise: float = 1.0
    distill: float = 0.2
    block: float = 0.2
    checkpoint_every: int = 100  # fine-tuning steps between an expert's checkpoints (and at its end)
    # "none" (the paper: every weight of the cut expert) or "lora": low-rank adapters (peft, extra
    # [lora]) of rank lora_rank (scale lora_alpha / rank, default 1) on its linear / conv weights
    adapter: str = "none"
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    # "materialised" (a plain diffusers model per expert) or "shared": index sets over the dense
    # weights + the expert's diffs / LoRA factors, loaded from one resident dense copy
    storage: str = "materialised"

    def __post_init__(self) -> None:
        from aptp.pruners.expert import STORAGES
        from aptp.pruners.lora import check_adapter

        key = self.KEY
        try:
            check_adapter(self.adapter, self.lora_rank)
        except ValueError as exc:
            raise ValueError(f"{key}.adapter / {key}.lora_rank: {exc}") from None
        if self.storage not in STORAGES:
            raise ValueError(f"{key}.storage={self.storage!r} is unknown; use one of {list(STORAGES)}.")
        values.positive("phase2.lr", self.lr, "(the paper: 1e-5, times sqrt(batch) with scale_lr)")
        values.weights("phase2.", self, ("denoise", "distill", "block"))
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"phase2 needs steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}.")
        if self.checkpoint_every < 1:
            raise ValueError(f"phase2.checkpoint_every={self.checkpoint_every} must be >= 1.")
        if self.split not in ("per_expert", "by_load"):
            raise ValueError(f"phase2.split={self.split!r} must be 'per_expert' or 'by_load'.")


def finetune_experts(ctx: TrainContext, archs: torch.Tensor, ids: torch.Tensor, settings: Phase2Config,
                     steps: Sequence[int], scale_lr: bool = True, resume: bool = True,
                     cut_backend: str = "aptp") -> dict[int, list[float]]:
    """Cut and fine-tune every expert k of ``archs`` (K, U) for ``steps[k]`` steps on the dataset
    rows ``ids`` (N,) routes to it (all rows when none is); the learning rate is ``settings.lr``
    times sqrt(batch) with ``scale_lr``. Returns each expert's distillation loss before and after."""
    lr = settings.lr * (math.sqrt(settings.batch_size) if scale_lr else 1.0)
    losses = {}
    for k in range(archs.shape[0]):
        members = (ids == k).nonzero().flatten()
        if len(members) == 0:
            ctx.log(f"expert {k}: no training prompt is routed to it; fine-tuning on all prompts")
            members = torch.arange(len(ctx.dataset))
        losses[k] = finetune_expert(ctx, k, archs[k], members, steps=steps[k], batch_size=settings.batch_size,
                                    lr=lr, weights=(settings.denoise, settings.distill, settings.block),
                                    resume=resume, cut_backend=cut_backend, checkpoint_every=settings.checkpoint_every,
                                    adapter=settings.adapter, lora_rank=settings.lora_rank,
                                    lora_alpha=settings.lora_alpha, storage=settings.storage)
    return losses


def finetune_expert(ctx: TrainContext, k: int, arch: torch.Tensor, members: torch.Tensor, steps: int,
                    batch_size: int, lr: float, weights: tuple[float, float, float], resume: bool = True,
                    cut_backend: str = "aptp", checkpoint_every: int = 100, adapter: str = "none",
                    lora_rank: int = 8, lora_alpha: float | None = None,
                    storage: str = "materialised") -> list[float]:
    """Cut expert ``k`` from the dense weights (with ``cut_backend``, see :meth:`TrainContext.cut`),
    fine-tune it on dataset rows ``members`` with the dense model as teacher (the loss of
    :meth:`TrainContext.task_loss`, weighted by ``weights`` = (denoise, distill, block)), checkpoint
    every ``checkpoint_every`` steps and at the end, save it under ``experts/expert-k``. Returns the
    output-distillation loss on a fixed batch of its prompts before and after fine-tuning.

    ``adapter="lora"``: train rank-``lora_rank`` LoRA adapters (peft) on the cut expert's
    linear / conv weights instead of all its weights (:mod:`aptp.pruners.lora`).
    ``storage="shared"``: save the expert as index sets over the dense weights plus its diffs
    (LoRA factors, or exact diffs after full fine-tuning) instead of its own weights
    (:func:`aptp.pruners.expert.save_expert`)."""
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1.")
    from aptp.pruners.expert import STORAGES
    from aptp.pruners.lora import attach_lora, check_adapter, detach_lora

    check_adapter(adapter, lora_rank)
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is unknown; use one of {list(STORAGES)}.")
    if resume and (done := finished_expert(ctx.output_dir, k)) is not None:  # finished in an earlier run
        return done
    expert = ctx.cut(arch, cut_backend)
    expert.train().requires_grad_(True)
    adapters = attach_lora(expert, lora_rank, lora_alpha) if adapter == "lora" else None  # the rest frozen
    opt = torch.optim.AdamW([p for p in expert.parameters() if p.requires_grad], lr=lr)
    ckpt_dir = ctx.output_dir / "checkpoints" / f"expert-{k}"
    start = 0
    if resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        start, state = found
        with reading(ckpt_dir, f"the checkpoint of step {start} under",
                     f"delete {ckpt_dir} to fine-tune expert {k} again, or rerun with --restart."):
            expert.load_state_dict(state["expert"])
            opt.load_state_dict(state["opt"])
            set_rng_state(state["rng"])
    student = CutStudent.of(expert, ctx.backbone)
    log = JsonlLogger(ctx.output_dir / "phase2.jsonl", enabled=ctx.is_main)
    log.rewind(start, expert=k)
    eval_batch = ctx.batch(global_batch_indices(len(members), batch_size, ctx.seed, 0), -1 - k, subset=members)
    before = ctx.distillation(expert, eval_batch)
    bar = tqdm(range(start, steps), desc=f"expert {k} fine-tune", disable=not (ctx.progress and ctx.is_main),
               initial=start, total=steps)
    for step in bar:
        idx = global_batch_indices(len(members), batch_size, ctx.seed + 7919 * (k + 1), step)
        batch = ctx.batch(idx, step + 1_000_000 * (k + 1), subset=members)
        # the same task loss as phase 1 (block distillation averaged over the blocks)
        loss, task = ctx.task_loss(batch, weights, batch_size, expert=student)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(expert.parameters())
        opt.step()
        log.write({"expert": k, "step": step, "loss": loss.item(), "denoise": task.denoise.item(),
                   "distill": task.distill.item(), "block": task.block.item()})
        bar.set_postfix(distill=f"{task.distill.item():.4f}")
        if ctx.is_main and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            save_checkpoint(ckpt_dir, step + 1, {"expert": expert.state_dict(), "opt": opt.state_dict(),
                                                 "rng": rng_state()})
    student.remove()
    expert.eval().requires_grad_(False)
    after = ctx.distillation(expert, eval_batch)
    lowrank = detach_lora(expert, adapters) if adapters is not None else None  # the cut weights, unchanged
    if ctx.is_main:
        extra: dict[str, Any] = {"adapter": adapter, **({"lora_rank": lora_rank} if adapters else {})}
        save_finetuned_expert(ctx, k, expert, arch, steps, [before, after], storage=storage, lowrank=lowrank,
                              extra=extra)
    ctx.barrier()
    return [before, after]
