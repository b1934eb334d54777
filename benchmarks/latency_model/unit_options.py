"""What the unit-size and minimum-width options do to a pruned world model's measured latency.

The world denoiser (``configs/backbone/world.yaml``, width + depth units) is pruned by magnitude
(the static baseline's criterion, ``select_at_budget``) at kept-MACs budgets 0.8 / 0.6 / 0.4 under
several granularity options, cut, and every model is timed with the dense one in the same
interleaved rounds (``aptp.timing.time_interleaved``: one torch thread, thread CPU time). Reported:
kept-MACs ratio, measured latency ratio, and their quotient (1 = latency follows MACs).

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/latency_model/unit_options.py --out benchmarks/latency_model/unit_options.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import aptp  # noqa: F401
import torch
from omegaconf import OmegaConf

from aptp.core.config import instantiate_config
from aptp.core.interfaces import AssignmentContext
from aptp.core.plugins import default_registry
from aptp.pruners.assignments.budget import select_at_budget
from aptp.pruners.assignments.magnitude import magnitude_importance
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {  # label -> granularity options (configs/granularity/both.yaml's, overridden)
    "default (paper's units)": {},
    "resnet channels_per_unit=16": {"resnet_channels": {"channels_per_unit": 16}},
    "resnet + ffn channels_per_unit=16, 32": {"resnet_channels": {"channels_per_unit": 16},
                                              "ffn": {"channels_per_unit": 32}},
    "default + resnet min_kept_channels=16": {"resnet_channels": {"min_kept_channels": 16}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t0 = time.time()
    reg = default_registry()
    spec = reg["backbone"].get("unet")
    backbone = spec.build(instantiate_config(spec, OmegaConf.load(ROOT / "configs" / "backbone" / "world.yaml")))
    denoiser = backbone.load("cpu").denoiser.eval().requires_grad_(False)
    cond = backbone.conditioning()
    models, rows = {}, []
    for label, opts in VARIANTS.items():
        grans = []
        for section in OmegaConf.load(ROOT / "configs" / "granularity" / "both.yaml"):
            gspec = reg["granularity"].get(section["name"])
            params = {**{k: v for k, v in section.items() if k != "name"}, **opts.get(section["name"], {})}
            grans.append(gspec.build(instantiate_config(gspec, params)))
        space = build_unit_space(denoiser, grans, cond)
        common = dict(unit_space=space, num_experts=1, target_ratio=0.6, denoiser=denoiser)
        try:
            ctx = AssignmentContext(**common, granularities=grans)
        except TypeError:  # before AssignmentContext had a granularities field
            ctx = AssignmentContext(**common, granularities=grans)
        imp = magnitude_importance(ctx)
        for budget in (0.8, 0.6, 0.4):
            arch = select_at_budget(space, imp, budget)
            key = f"m{len(models)}"
            models[key] = cut_model(denoiser, space, grans, arch).eval()
            rows.append({"variant": label, "units": space.size, "budget": budget, "key": key,
                         "macs_ratio": round(float(space.macs_ratio(arch.double())), 4)})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *cond.sample_shape, generator=g)
    t = torch.full((1,), 500, dtype=torch.long)
    c = torch.randn(1, cond.text_len, cond.text_dim, generator=g)
    cands = {"dense": lambda: backbone.denoise(denoiser, x, t, c)}
    cands.update({k: (lambda m=m: backbone.denoise(m, x, t, c)) for k, m in models.items()})
    tm = time_interleaved(cands, rounds=args.rounds, repeats=args.repeats, warmup=1, threads=1)
    dense = tm["dense"].median
    print("| granularity options | U | MACs budget | kept-MACs ratio | latency ratio (measured) | latency / MACs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["latency_ratio"] = round(tm[r.pop("key")].median / dense, 4)
        print(f"| {r['variant']} | {r['units']} | {r['budget']} | {r['macs_ratio']:.3f} | {r['latency_ratio']:.3f} | "
              f"{r['latency_ratio'] / r['macs_ratio']:.2f} |")
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}", "torch": torch.__version__,
            "threads": 1, "clock": "thread CPU time, interleaved (measured under contention)", "dense_ms": round(dense, 3),
            "rounds": args.rounds, "repeats": args.repeats, "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
