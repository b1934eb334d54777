"""Predicted vs measured latency of pruned denoisers: the ``profiled`` latency model vs kept MACs.

For each backbone preset (``tiny``, ``small``, ``world``; width + depth units, ``configs/granularity/both``)
on CPU: fit the ``profiled`` latency model (one thread, thread CPU time, batch 1, fp32), then cut the
denoiser to >= 20 architectures -- uniform widths, random units (some blocks dropped), magnitude
(the static baseline) at several MACs budgets, depth drops, the experts of ``runs/*/cells/*/experts``
that fit the preset's unit space, and magnitude experts pruned to a *latency* target
(``aptp.latency.resource.latency_budget``) -- and time them with the dense model in interleaved
rounds (``aptp.timing.time_interleaved``, chunks of ``--chunk`` candidates plus the dense model).

Reported per preset: the relative error of the latency model's predicted latency (ms) and of its
predicted latency ratio, and of the kept-MACs ratio taken as a latency-ratio predictor, against the
measured latency ratio (median and max over architectures); and measured / target for the
latency-targeted experts. Rows go to ``--out`` (JSON), the summary to stdout (markdown).

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/latency_model/run.py
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from aptp.core.config import instantiate_config
from aptp.core.interfaces import AssignmentContext
from aptp.core.plugins import default_registry
from aptp.latency.base import LatencyContext
from aptp.latency.profiled import ProfiledLatency, ProfiledLatencyConfig, device_name
from aptp.latency.resource import latency_budget
from aptp.pruners.assignments.budget import select_at_budget
from aptp.pruners.assignments.magnitude import magnitude_importance
from aptp.pruners.gating import build_unit_space, cut_model, uniform_architecture
from aptp.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(preset: str):
    reg = default_registry()
    spec = reg["backbone"].get("unet")
    backbone = spec.build(instantiate_config(spec, OmegaConf.load(ROOT / "configs" / "backbone" / f"{preset}.yaml")))
    torch.manual_seed(0)
    denoiser = backbone.load("cpu").denoiser if preset == "world" else backbone.build_denoiser("cpu")
    denoiser = denoiser.eval().requires_grad_(False)
    grans = []
    for section in OmegaConf.load(ROOT / "configs" / "granularity" / "both.yaml"):
        gspec = reg["granularity"].get(section["name"])
        grans.append(gspec.build(instantiate_config(gspec, section)))
    space = build_unit_space(denoiser, grans, backbone.conditioning())
    return backbone, denoiser, grans, space


def architectures(space, denoiser, grans, model, seed: int = 0) -> list[tuple[str, torch.Tensor, float | None]]:
    """(label, arch (U,), latency target or None)."""
    out: list[tuple[str, torch.Tensor, float | None]] = []
    for r in (0.9, 0.75, 0.6, 0.45, 0.3):
        out.append((f"uniform {r}", uniform_architecture(space, r), None))
    g = torch.Generator().manual_seed(seed)
    depth = torch.zeros(space.size, dtype=torch.bool)
    for i, grp in enumerate(space.groups):
        if grp.unit_paths:
            depth[space.group_slice(i)] = True
    for p in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        a = (torch.rand(space.size, generator=g) < p).float()
        a[depth] = (torch.rand(int(depth.sum()), generator=g) < 0.5 + p / 2).float()  # blocks drop less often
        out.append((f"random {p}", a, None))
    ctx = AssignmentContext(unit_space=space, num_experts=1, target_ratio=0.6, denoiser=denoiser,
                            granularities=grans)
    importance = magnitude_importance(ctx)
    for r in (0.8, 0.6, 0.4):
        out.append((f"magnitude macs {r}", select_at_budget(space, importance, r), None))
    idx = torch.nonzero(depth).flatten()
    for n in (len(idx) // 2, len(idx)):
        a = space.dense().clone()
        a[idx[:n]] = 0.0  # drop priority order: unit 0 first
        out.append((f"depth -{n}", a, None))
    for target in (0.8, 0.7, 0.6):
        def assign(s, ratio):
            return select_at_budget(s, importance, ratio).unsqueeze(0)
        out.append((f"magnitude latency {target}", latency_budget(assign, space, target, model)[0], target))
    seen = set()
    for f in sorted(glob.glob(str(ROOT / "runs" / "*" / "cells" / "*" / "experts" / "*" / "aptp_expert.json"))):
        meta = json.loads(Path(f).read_text())
        if meta.get("unit_space", {}).get("fingerprint") != space.fingerprint():
            continue
        a = torch.tensor(meta["architecture"], dtype=torch.float32)
        key = tuple(a.int().tolist())
        if key in seen:
            continue
        seen.add(key)
        parts = Path(f).parts
        out.append((f"expert {parts[-5]}/{parts[-4]}/{parts[-2]}", a, None))
    return out


def measure(backbone, denoiser, space, grans, archs, chunk: int, rounds: int, repeats: int):
    """(ms, ratio to the dense model of the same chunk) per architecture."""
    g = torch.Generator().manual_seed(1)
    cond = backbone.conditioning()
    x = torch.randn(1, *cond.sample_shape, generator=g)
    t = torch.full((1,), 500, dtype=torch.long)
    c = torch.randn(1, cond.text_len, cond.text_dim, generator=g)
    results = []
    for start in range(0, len(archs), chunk):
        part = archs[start:start + chunk]
        models = {f"a{start + i}": cut_model(denoiser, space, grans, a).eval() for i, (_, a, _) in enumerate(part)}
        cands = {"dense": lambda: backbone.denoise(denoiser, x, t, c)}
        for k, m in models.items():
            cands[k] = (lambda m=m: backbone.denoise(m, x, t, c))
        tm = time_interleaved(cands, rounds=rounds, repeats=repeats, warmup=1, threads=1)
        dense = tm["dense"].median
        for k in models:
            results.append((tm[k].median, tm[k].median / dense, dense))
        log(f"  measured {start + len(part)}/{len(archs)} (dense {dense:.2f} ms)")
    return results


def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["tiny", "small", "world"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--cache-dir", default="", help="latency tables (default: a fresh temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="aptp-latency-")
    rows, summary = [], []
    t_all = time.time()
    for preset in args.presets:
        t0 = time.time()
        backbone, denoiser, grans, space = build(preset)
        model = ProfiledLatency(ProfiledLatencyConfig(device="cpu", dtype="float32", buckets=args.buckets,
                                                      rounds=args.rounds, repeats=args.repeats, cache_dir=cache))
        tp = time.process_time()
        model.fit(LatencyContext(denoiser, space, grans, backbone.conditioning(), backbone.denoise))
        profile_cpu_s = time.process_time() - tp
        log(f"{preset}: U={space.size}, groups={len(space.groups)}, dense predicted {model.dense_ms:.2f} ms, "
            f"profiled in {time.time() - t0:.0f} s wall / {profile_cpu_s:.0f} s CPU")
        archs = architectures(space, denoiser, grans, model)
        measured = measure(backbone, denoiser, space, grans, archs, args.chunk, args.rounds, args.repeats)
        for (label, a, target), (ms, ratio, dense) in zip(archs, measured):
            a64 = a.double()
            rows.append({"preset": preset, "arch": label, "macs_ratio": float(space.macs_ratio(a64)),
                         "pred_ms": float(model.latency(a64)), "pred_ratio": float(model.latency_ratio(a64)),
                         "meas_ms": ms, "meas_ratio": ratio, "dense_ms": dense, "target": target})
        r = [x for x in rows if x["preset"] == preset]
        meas_ms, meas_ratio = np.array([x["meas_ms"] for x in r]), np.array([x["meas_ratio"] for x in r])
        e_ms = rel(np.array([x["pred_ms"] for x in r]), meas_ms)
        e_ratio = rel(np.array([x["pred_ratio"] for x in r]), meas_ratio)
        e_macs = rel(np.array([x["macs_ratio"] for x in r]), meas_ratio)
        # measured / target of the latency-targeted experts (None: the target is below the smallest reachable)
        tgt = [x["meas_ratio"] / x["target"] if x["pred_ratio"] <= x["target"] + 0.01 else None for x in r if x["target"]]
        summary.append({"preset": preset, "n": len(r), "U": space.size, "dense_ms": float(np.median([x["dense_ms"] for x in r])),
                        "pred_dense_ms": model.dense_ms, "profile_s": round(time.time() - t0, 1),
                        "ms_err_median": float(np.median(e_ms)), "ms_err_max": float(e_ms.max()),
                        "ratio_err_median": float(np.median(e_ratio)), "ratio_err_max": float(e_ratio.max()),
                        "macs_err_median": float(np.median(e_macs)), "macs_err_max": float(e_macs.max()),
                        "latency_over_macs_median": float(np.median(meas_ratio / np.array([x["macs_ratio"] for x in r]))),
                        "target_hits": [None if v is None else round(v, 3) for v in tgt]})
        log(f"{preset} done in {time.time() - t0:.0f} s")
        del denoiser, model
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "device": device_name(torch.device("cpu")),
            "torch": torch.__version__, "threads": 1, "clock": "thread_time", "rounds": args.rounds,
            "repeats": args.repeats, "buckets": args.buckets, "wall_s": round(time.time() - t_all, 1)}
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"| preset | archs | dense ms (measured / predicted) | latency model: ms error median / max | "
          f"latency model: ratio error median / max | kept MACs as ratio: error median / max | "
          f"measured latency ratio / MACs ratio (median) | latency-targeted experts (0.8, 0.7, 0.6): measured / target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        print(f"| {s['preset']} (U={s['U']}) | {s['n']} | {s['dense_ms']:.2f} / {s['pred_dense_ms']:.2f} | "
              f"{100 * s['ms_err_median']:.1f} % / {100 * s['ms_err_max']:.1f} % | "
              f"{100 * s['ratio_err_median']:.1f} % / {100 * s['ratio_err_max']:.1f} % | "
              f"{100 * s['macs_err_median']:.1f} % / {100 * s['macs_err_max']:.1f} % | "
              f"{s['latency_over_macs_median']:.2f} | "
              f"{', '.join('unreachable' if v is None else f'{v:.3f}' for v in s['target_hits'])} |")
    print(f"\n{json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
