"""How a 3x3 convolution's and a linear layer's CPU latency step with the kept channels, at the
world preset's shapes (batch 1): what a hardware-aligned unit size (``channels_per_unit``) and a
minimum kept width (``min_kept_channels``) should be on this CPU (issue 17).

Families (each timed in its own interleaved rounds, ``aptp.timing.time_interleaved``: one torch
thread, thread CPU time, every candidate in every round, the order rotated; each call runs the
layer ``--inner`` times):

* ``conv2 C@H``: ResNet conv2, ``Conv2d(k -> C, 3x3)`` on (1, k, H, H) -- k kept inner channels in;
* ``conv1 C@H``: ResNet conv1, ``Conv2d(C -> k, 3x3)`` on (1, C, H, H) -- k kept channels out;
* ``ffn``: the attention block's GEGLU feed-forward at 8x8 (64 tokens, 128 channels):
  ``Linear(128 -> 2k)`` then ``Linear(k -> 128)``, k of 512 inner channels kept.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/latency_model/unit_steps.py --out benchmarks/latency_model/unit_steps.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import aptp  # noqa: F401  (before diffusers / torch-heavy imports, as everywhere in aptp)
import torch
from torch import nn

from aptp.timing import time_interleaved


def family(kind: str, c: int, h: int, ks: list[int], inner: int):
    g = torch.Generator().manual_seed(0)
    cands = {}
    for k in ks:
        if kind == "conv2":
            m, x = nn.Conv2d(k, c, 3, padding=1), torch.randn(1, k, h, h, generator=g)
            fn = (lambda m=m, x=x: [m(x) for _ in range(inner)])
        elif kind == "conv1":
            m, x = nn.Conv2d(c, k, 3, padding=1), torch.randn(1, c, h, h, generator=g)
            fn = (lambda m=m, x=x: [m(x) for _ in range(inner)])
        else:  # ffn: GEGLU proj (c -> 2k) + out (k -> c) on h*h tokens
            p, o = nn.Linear(c, 2 * k), nn.Linear(k, c)
            x = torch.randn(1, h * h, c, generator=g)

            def fn(p=p, o=o, x=x):
                for _ in range(inner):
                    a, b = p(x).chunk(2, dim=-1)
                    o(a * torch.nn.functional.gelu(b))
        cands[str(k)] = fn
    return cands


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    specs = [("conv2", 32, 32, list(range(1, 33))), ("conv1", 32, 32, list(range(1, 33))),
             ("conv2", 64, 16, list(range(1, 65))), ("conv1", 64, 16, list(range(1, 65))),
             ("conv2", 128, 8, list(range(1, 129, 1))), ("ffn", 128, 8, [1, 2, 4, *range(8, 513, 8)])]
    t0 = time.time()
    rows = []
    for kind, c, h, ks in specs:
        with torch.no_grad():
            timing = time_interleaved(family(kind, c, h, ks, args.inner), rounds=args.rounds, repeats=args.repeats,
                                      warmup=1, threads=1)
        ms = {int(k): t.median / args.inner for k, t in timing.items()}
        rows.append({"family": f"{kind} {c}@{h}", "kind": kind, "channels": c, "side": h,
                     "ms": {str(k): round(v, 5) for k, v in ms.items()}})
        full = ms[max(ms)]
        pts = [k for k in (1, 2, 4, 8, 12, 16, 17, 24, 32, 33, 48, 64, 96, 128, 256, 512) if k in ms]
        print(f"{kind} {c}@{h}: full {full:.4f} ms; " + ", ".join(f"k={k}: {ms[k] / full:.2f}" for k in pts), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
            "torch": torch.__version__, "threads": 1, "clock": "thread CPU time (measured under contention)",
            "rounds": args.rounds, "repeats": args.repeats, "inner": args.inner, "wall_s": round(time.time() - t0, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
