"""Phase 2 on the world backbone: full fine-tuning vs LoRA adapters of rank r, same expert, data and
steps; the output-distillation MSE against the dense model on a fixed batch of the expert's prompts
before and after (``TrainContext.finetune_expert``'s own figure), and the expert's stored diff size.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/lora_vs_full.py    # writes lora_vs_full_world.json

A proxy of quality, not the evaluation protocol (``aptp compare``): phase2 in the experiment configs
does not yet take ``adapter`` / ``lora_rank`` (see issue 18's note).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _world import architectures  # noqa: E402

from aptp.core.build import build  # noqa: E402
from aptp.core.config import load_experiment  # noqa: E402
from aptp.pruners.expert import DELTA_FILE, load_expert, read_expert_meta, save_expert  # noqa: E402
from aptp.pruners.training import DataConfig, TrainContext, global_batch_indices  # noqa: E402

STEPS, BATCH = 150, 8
CASES = [("full", "none", 0, 5e-4), ("lora r=2", "lora", 2, 5e-3), ("lora r=4", "lora", 4, 5e-3),
         ("lora r=8", "lora", 8, 5e-3)]  # (label, adapter, rank, lr): the world preset's phase-2 lr for full


def compressed(ctx: TrainContext, folder: Path, arch: torch.Tensor, lr: float, before: float) -> list[dict]:
    """The fully fine-tuned expert in ``folder`` saved again with its diffs at rank r (``diff_rank``):
    the distillation MSE on the same fixed batch as ``finetune_expert``'s, and the stored diff size."""
    full = load_expert(folder, dense=ctx.denoiser)
    eval_batch = ctx.batch(global_batch_indices(512, BATCH, ctx.seed, 0), -1, subset=torch.arange(512))
    ctx.features.remove()  # (as finetune_expert does before a shared save)
    rows = []
    for r in (4, 16, 64):
        out = save_expert(folder.parent / f"r{r}", full, arch, ctx.unit_space, ctx.granularities, ctx.conditioning,
                          backbone=read_expert_meta(folder)["backbone"], storage="shared", dense=ctx.denoiser,
                          diff_rank=r)
        rows.append({"phase2": f"full, diffs at rank {r} (lossy)", "lr": lr, "distill_before": before,
                     "distill_after": ctx._distillation(load_expert(out, dense=ctx.denoiser), eval_batch),
                     "stored_diff_mib": (out / DELTA_FILE).stat().st_size / 2**20, "cpu_s": 0.0})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    composition = build(load_experiment("world", ["pruner.progress=false"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, adapter, rank, lr in CASES:
            out = Path(tmp) / label.replace(" ", "_").replace("=", "")
            ctx = TrainContext(composition, DataConfig(num_samples=512, seed=0), out, progress=False)
            _, _, archs, _ = architectures(ctx.denoiser, ctx.conditioning)
            t0 = time.process_time()
            before, after = ctx.finetune_expert(0, archs[3], torch.arange(512), steps=STEPS, batch_size=BATCH, lr=lr,
                                                weights=(0.01, 0.5, 0.5), resume=False, checkpoint_every=STEPS,
                                                adapter=adapter, lora_rank=max(rank, 1), storage="shared")
            delta = (out / "experts" / "expert-0" / DELTA_FILE).stat().st_size
            rows.append({"phase2": label, "lr": lr, "distill_before": before, "distill_after": after,
                         "stored_diff_mib": delta / 2**20, "cpu_s": time.process_time() - t0})
            print(rows[-1], flush=True)
            if adapter == "none":  # the full fine-tuning's exact diffs compressed to rank r (lossy)
                rows.extend(compressed(ctx, out / "experts" / "expert-0", archs[3], lr, before))
            ctx.gates.remove()
    path = Path(__file__).with_name("lora_vs_full_world.json")
    path.write_text(json.dumps({"date": str(date.today()), "steps": STEPS, "batch_size": BATCH,
                                "expert_macs_ratio_index": 3, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
