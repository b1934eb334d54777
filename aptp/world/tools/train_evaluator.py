"""Train the world's slot-attribute evaluator CNN (minutes on one CPU thread).

    python -m aptp.world.tools.train_evaluator --out aptp/assets/world/evaluator [--steps 2000]

Training images are drawn on the fly from the world (seeds `--data-seed` and `--data-seed + 1`:
half one-object scenes of every kind (the capacity-graded `plain` / `placed` / `glyph` and the older
`single` / `text`) placed up to 0.14 of the side off their slot (0.07 for the large glyphs), half
multi-object scenes with 0.07 jitter; more colour jitter than the default world) and augmented with
noise, blur and brightness changes so that the evaluator also reads imperfect generated images. It is
validated on a held-out seed of the default (graded) world, per kind, and of the multi-object kinds. Writes `model.safetensors` (fp16), `config.json`
(architecture, validation figures, the command) and `README.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aptp.world.data import EVERY_KIND_MIX, World, WorldConfig
from aptp.world.evaluator import Evaluator, attribute_accuracy, images_to_tensor, scene_targets, score_images

HELD_OUT_SEED = 777_777


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m aptp.world.tools.train_evaluator",
        description="Train the world's per-slot attribute evaluator CNN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-size", type=int, default=1000)
    a = p.parse_args(argv)
    if a.steps <= 0 or a.batch_size <= 0:
        p.error(f"--steps={a.steps} and --batch-size={a.batch_size} must be > 0")
    return a


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, blur and brightness / per-channel shifts, like the artefacts of generated images."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = (torch.rand(b, 1, 1, 1, generator=g) < 0.3).float() * torch.rand(b, 1, 1, 1, generator=g)
    x = x * (1 - mix) + blur * mix
    scale = 0.85 + 0.25 * torch.rand(b, 1, 1, 1, generator=g)
    shift = 0.08 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    x = (x + 1) * scale - 1 + shift
    sigma = 0.15 * torch.rand(b, 1, 1, 1, generator=g)
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def batch(world: World, seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    samples = [world.sample_one(seed, start + j) for j in range(n)]
    x = images_to_tensor([s.image for s in samples])
    tg = [scene_targets(s.scene) for s in samples]
    y = {k: torch.tensor([t[k] for t in tg]) for k in tg[0]}  # each (n, 5)
    return x, y, samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from safetensors.torch import save_file
    from tqdm import tqdm

    # half of each batch: one object (or letter) up to 0.14 of the side off its slot centre, so that
    # objects a generator draws between slots are read in the nearest slot; the other half:
    # multi-object scenes with 0.07 jitter (more would let neighbouring objects overlap)
    single_world = World(WorldConfig(jitter=0.14, colour_jitter=25, partial_prob=0.0,
                                     mix=(("single", 0.35), ("text", 0.15), ("plain", 0.1), ("placed", 0.1))))
    glyph_world = World(WorldConfig(jitter=0.07, colour_jitter=25, mix=(("glyph", 1.0),)))
    multi_world = World(WorldConfig(jitter=0.07, colour_jitter=25, partial_prob=0.0,
                                    mix=(("pair_position", 0.35), ("pair_relation", 0.3), ("triple", 0.35))))
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in tqdm(range(args.steps), desc="train_evaluator", mininterval=20, file=sys.stderr):
        quarter = args.batch_size // 4
        parts = [batch(single_world, args.data_seed, step * quarter, quarter),
                 batch(glyph_world, args.data_seed + 2, step * quarter, quarter),
                 batch(multi_world, args.data_seed + 1, step * quarter, args.batch_size - 2 * quarter)]
        x = torch.cat([p[0] for p in parts])
        y = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        logits = model(augment(x, g))
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), y[k].flatten(), ignore_index=-100) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4)}), flush=True)
    train_s = time.time() - t0
    model.eval()

    # validation on held-out seeds of the default (graded) world and of the multi-object kinds
    val_world = World(WorldConfig(mix=EVERY_KIND_MIX))
    x, y, samples = batch(val_world, HELD_OUT_SEED, 0, args.val_size)
    with torch.no_grad():
        logits = model(x)
    head_acc = {}
    for k in logits:
        mask = y[k] != -100
        head_acc[k] = float((logits[k].argmax(-1)[mask] == y[k][mask]).float().mean())
    scores = attribute_accuracy(score_images(model, x, [s.scene for s in samples]))
    per_kind = {}
    for kind in sorted({s.scene.kind for s in samples}):
        ss = [s for s in samples if s.scene.kind == kind]
        per_kind[kind] = attribute_accuracy(score_images(model, [s.image for s in ss], [s.scene for s in ss]))["all"]

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    cmd = "python -m aptp.world.tools.train_evaluator " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = {
        **model.config,
        "command": cmd,
        "train_seconds": round(train_s, 1),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "val_seed": HELD_OUT_SEED,
        "val_size": args.val_size,
        "val_slot_head_accuracy": {k: round(v, 4) for k, v in head_acc.items()},
        "val_attribute_accuracy_all_kinds": {k: (round(v, 4) if v is not None else None) for k, v in scores.items()},
        "val_whole_scene_accuracy_per_kind": {k: round(v, 4) for k, v in per_kind.items()},
    }
    (args.out / "config.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "README.md").write_text(
        "# World evaluator (per-slot attribute CNN)\n\n"
        f"Trained {args.steps} steps x batch {args.batch_size} in {train_s:.0f} s on {args.threads} CPU thread(s):\n\n"
        f"```\n{cmd}\n```\n\n"
        f"Validation on {args.val_size} clean renders of every kind in equal shares, seed {HELD_OUT_SEED}:\n\n"
        f"- per-slot head accuracy: {json.dumps(report['val_slot_head_accuracy'])}\n"
        f"- attribute accuracy, all kinds: {json.dumps(report['val_attribute_accuracy_all_kinds'])}\n"
        f"- whole scene right, per kind: {json.dumps(report['val_whole_scene_accuracy_per_kind'])}\n\n"
        "Load with `aptp.world.evaluator.load_evaluator()`.\n"
    )
    print(json.dumps(report, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
