"""Runs of the pruning procedures on the tiny random backbone at a 16 px resolution."""

from __future__ import annotations

import json
from pathlib import Path

from aptp.core.build import build
from aptp.core.config import load_experiment


def run_experiment(output_dir: Path, overrides: list[str], experiment: str = "smoke"):
    cfg = load_experiment(experiment, ["backbone.resolution=16", "pruner.progress=false", *overrides])
    composition = build(cfg)
    return composition, composition.pruner.run(composition, output_dir)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


PHASE1 = ["router.num_experts=4", "pruner.steps=160", "pruner.warmup_steps=50", "pruner.batch_size=8",
          "pruner.lr=0.1", "pruner.scale_lr=false", "pruner.log_every=10", "pruner.checkpoint_every=1000",
          "pruner.phase2.steps=0", "pruner.data.num_samples=128"]
