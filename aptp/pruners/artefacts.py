"""What a pruning run leaves in its folder, besides checkpoints (:mod:`aptp.core.checkpoint`):

    phase1.jsonl, phase2.jsonl     metrics logs, one JSON object per line (:class:`JsonlLogger`)
    experts/expert-k/              each fine-tuned expert (:func:`save_finetuned_expert`), with
                                   finetune.json (its distillation loss before and after)
    router/                        the router bundle: encoder + router + architectures + unit space

Every folder is written under a temporary name and moved into place (a killed run leaves no half
folder), by the main process only.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from aptp.core.build import replace_dir
from aptp.core.errors import reading

FINETUNE_RECORD = "finetune.json"


class JsonlLogger:
    """Appends one JSON object per line (the run's metrics log)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def rewind(self, step: int, **match: Any) -> None:
        """Drop records at or after ``step`` (those matching ``match``): a resumed run logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a killed run: logged again from the checkpoint
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("step", -1) >= step and all(rec.get(k) == v for k, v in match.items()):
                continue
            keep.append(line)
        self.path.write_text("".join(f"{line}\n" for line in keep))


def expert_folder(output_dir: Path, k: int) -> Path:
    return Path(output_dir) / "experts" / f"expert-{k}"


def finished_expert(output_dir: Path, k: int) -> list[float] | None:
    """The distillation loss before and after fine-tuning of expert ``k`` if an earlier run finished it."""
    record = expert_folder(output_dir, k) / FINETUNE_RECORD
    if not record.is_file():
        return None
    with reading(record, "finished expert's record",
                 "delete that expert folder to fine-tune it again, or rerun with --restart."):
        return list(json.loads(record.read_text())["distill_before_after"])


def save_finetuned_expert(ctx, k: int, expert: torch.nn.Module, arch: torch.Tensor, steps: int,
                          before_after: list[float], storage: str = "materialised",
                          lowrank: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Save expert ``k`` (cut to ``arch`` (U,), fine-tuned for ``steps``) under ``experts/expert-k``
    with its ``finetune.json``, atomically (:func:`aptp.pruners.expert.save_expert`; ``storage="shared"``
    stores it as index sets over ``ctx``'s dense weights plus its diffs or ``lowrank`` factors).
    ``ctx``: the :class:`~aptp.pruners.training.TrainContext` it was cut from."""
    from aptp.pruners.expert import save_expert

    final = expert_folder(ctx.output_dir, k)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique per process
    with ctx.without_feature_hooks():  # the shared save probes a copy of the dense model: no recorder hooks in it
        save_expert(tmp, expert, arch, ctx.unit_space, ctx.granularities, ctx.conditioning,
                    backbone=OmegaConf.to_container(ctx.composition.config.backbone, resolve=True),
                    storage=storage, dense=ctx.denoiser if storage == "shared" else None, lowrank=lowrank,
                    extra=extra, registry=ctx.composition.registry)
    (tmp / FINETUNE_RECORD).write_text(json.dumps({"steps": steps, "distill_before_after": before_after}))
    replace_dir(tmp, final)
    return final


def save_bundle(ctx, router, architectures: torch.Tensor) -> Path | None:
    """The router bundle (encoder + router + architectures (K, U) + unit space) under ``router/``
    (main process; None on the others)."""
    from aptp.routers.bundle import save_router_bundle

    if not ctx.is_main:
        return None
    return save_router_bundle(ctx.output_dir / "router", ctx.encoder, router,
                              unit_space=ctx.unit_space, architectures=architectures)
