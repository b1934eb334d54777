"""Serving benchmark: replay Poisson request traces through ExpertScheduler and report throughput
and p50 / p95 latency of K = 8 routed experts against the dense and the static model at equal mean
kept MACs, on the embedded world backbone.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/serving.py      # writes serving_world.json

Prompts: half world captions, half PartiPrompts (/work/shared/data/PartiPrompts.tsv, column
``Prompt``; APTP_PARTI overrides the path). Router: k-means (K = 8) on the MiniLM embeddings of a
separate pool of the same two sources. Experts: scattered-unit cuts of the dense weights (see
``_world.architectures``); ``routed`` runs them materialised, ``routed shared`` as SharedExperts
over one dense copy with rank-4 low-rank diffs (gathered at each call). Weights are not fine-tuned:
latency does not depend on their values. Loads: ``burst`` (all requests at t = 0: saturation), then
Poisson arrivals at 0.5x and 0.9x the static model's burst throughput (one round each; the burst:
3 interleaved rounds, medians), the same rates for every
model. Latency and throughput are wall-clock (a scheduler's latency includes waiting), so on a
shared machine they measure the neighbours too; ``cpu_throughput`` = requests / CPU time of the
serving thread (routing + every group; one torch thread), which does not count time spent waiting
for a core: the contention-free saturating throughput.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _world import K, architectures, world_backbone  # noqa: E402

from aptp.core.plugins import default_registry  # noqa: E402
from aptp.world.data import World, WorldConfig  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from aptp.pruners.expert import LowRank, SharedExpert, _Entry, slice_map  # noqa: E402
from aptp.pruners.gating import cut_model  # noqa: E402
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig  # noqa: E402
from aptp.routers.single import SingleRouter  # noqa: E402
from aptp.serving import ExpertScheduler  # noqa: E402

PARTI = Path(os.environ.get("APTP_PARTI", "/work/shared/data/PartiPrompts.tsv"))
N = int(os.environ.get("APTP_SERVE_REQUESTS", "64"))  # requests per trace
STEPS = int(os.environ.get("APTP_SERVE_STEPS", "10"))  # denoising steps per image
MAX_BATCH, MAX_WAIT = 8, 0.1
LOADS = (0.5, 0.9)  # Poisson rates as fractions of the static model's burst throughput
BURST_ROUNDS = 3  # interleaved rounds of the saturating load (median reported)


def prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts, alternating world captions and PartiPrompts."""
    rng = random.Random(seed)
    with open(PARTI, newline="") as fh:
        parti = [row["Prompt"] for row in csv.DictReader(fh, delimiter="\t") if row.get("Prompt")]
    world = [s.caption for s in World(WorldConfig(image_size=32)).sample(n, seed=seed)]
    return [world[i // 2] if i % 2 == 0 else rng.choice(parti) for i in range(n)]


def shared_expert(dense, space, grans, arch, rank: int, seed: int) -> SharedExpert:
    """A SharedExpert over ``dense`` with rank-``rank`` diffs on every 2-D / 4-D weight."""
    cut = cut_model(dense, space, grans, arch)
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, sl in slice_map(dense, space, grans, arch).items():
        p = dict(cut.named_parameters()).get(name)
        lr = (LowRank(1e-3 * torch.randn(rank, p[0].numel(), generator=g), 1e-3 * torch.randn(p.shape[0], rank, generator=g))
              if p is not None and p.dim() >= 2 and name.endswith("weight") else None)
        entries[name] = _Entry(sl, lowrank=lr)
    return SharedExpert(cut.to("meta"), dense, entries).eval()


def replay(server: ExpertScheduler, trace: list[str], arrivals: list[float]) -> dict:
    """Submit ``trace[i]`` at ``arrivals[i]`` seconds after the start; wait for every result."""
    futures = []
    start = time.monotonic()
    for i, (p, at) in enumerate(zip(trace, arrivals)):
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(server.submit(p, generator=torch.Generator().manual_seed(i)))
    results = [f.result(timeout=600) for f in futures]
    cpu_s = server.stats.cpu_s  # the serving thread's CPU time so far (routing + groups)
    lat = np.array([r.latency_s for r in results])
    span = max(r.finished_s for r in results) - min(r.submitted_s for r in results)
    sizes = [r.batch_size for r in results]
    return {"throughput": len(results) / span, "cpu_throughput": len(results) / cpu_s,
            "route_cpu_share": server.stats.route_cpu_s / cpu_s, "groups": len(server.stats.groups), "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)), "mean_batch": float(np.mean(sizes)),
            "expert_ids": [r.expert_id for r in results]}


def main() -> None:
    torch.set_num_threads(1)
    t_start = time.monotonic()
    bb, _ = world_backbone()
    modules = bb.load()
    dense = modules.denoiser.eval()
    cond = bb.conditioning()
    space, grans, archs, static_arch = architectures(dense, cond)
    ratios = space.macs_ratio(archs)  # (K,)
    reg = default_registry()["encoder"]
    spec = reg.get("minilm")
    encoder = spec.build(spec.config_class(cache_size=0))  # every request pays its routing (no embedding cache)
    router = KMeansRouter(KMeansRouterConfig(num_experts=K, seed=0))
    router.fit(encoder.encode(prompts(256, seed=1)))  # a pool apart from the trace
    experts = {k: cut_model(dense, space, grans, archs[k]).eval() for k in range(K)}
    shared = {k: shared_expert(dense, space, grans, archs[k], rank=4, seed=k) for k in range(K)}
    static = cut_model(dense, space, grans, static_arch).eval()
    pipes = {
        "dense": RoutedPipeline(bb, modules, encoder, SingleRouter(), {0: dense}),
        f"static @ {float(space.macs_ratio(static_arch)):.3f}": RoutedPipeline(bb, modules, encoder, SingleRouter(), {0: static}),
        "routed K=8": RoutedPipeline(bb, modules, encoder, router, experts),
        "routed K=8 shared (r=4)": RoutedPipeline(bb, modules, encoder, router, shared),
    }
    trace = prompts(N, seed=2)
    ids = pipes["routed K=8"].route(trace)
    routed_mean = float(ratios[ids].mean())
    print(f"routed load {torch.bincount(ids, minlength=K).tolist()}, load-weighted mean kept MACs {routed_mean:.3f}", flush=True)
    for p in pipes.values():  # warm-up: one group per expert
        s = ExpertScheduler(p, max_batch=MAX_BATCH, max_wait_s=0.0, num_inference_steps=1)
        s.submit_many(trace[:16])
        s.poll(flush=True)
    rows = []
    order = list(pipes)

    def run(load: str, arrivals: list[float], rounds: int) -> None:
        """Every model on the same trace, ``rounds`` interleaved rounds in rotated order; the median of each figure."""
        runs: dict[str, list[dict]] = {n: [] for n in order}
        for i in range(rounds):
            for name in order[i % len(order):] + order[: i % len(order)]:  # no fixed position
                with ExpertScheduler(pipes[name], max_batch=MAX_BATCH, max_wait_s=MAX_WAIT, num_inference_steps=STEPS) as server:
                    r = replay(server, trace, arrivals)
                r.pop("expert_ids")
                runs[name].append(r)
                print(load, name, r, flush=True)
        for name in order:
            rows.append({"model": name, "load": load, "rounds": rounds,
                         **{k: float(np.median([r[k] for r in runs[name]])) for k in runs[name][0]}})

    run("burst", [0.0] * N, BURST_ROUNDS)  # saturation
    static_burst = next(r for r in rows if r["model"].startswith("static"))["throughput"]
    for f in LOADS:  # Poisson arrivals at fractions of the static model's wall-clock burst throughput
        rate = f * static_burst
        arrivals = np.cumsum(np.random.default_rng(3).exponential(1.0 / rate, N)).tolist()
        run(f"{f}x static ({rate:.2f}/s)", arrivals, 1)
    out = {"date": str(date.today()), "machine": f"cpu {platform.machine()}, {os.cpu_count()} cores, 1 torch thread, nice 19, shared with a training job",
           "versions": f"Python {platform.python_version()}, torch {torch.__version__}", "requests": N, "steps": STEPS,
           "max_batch": MAX_BATCH, "max_wait_s": MAX_WAIT, "scheduler": "encode once (reuse_text=True)", "expert_macs_ratios": [round(float(r), 3) for r in ratios],
           "routed_load_weighted_macs": routed_mean, "static_macs": float(space.macs_ratio(static_arch)),
           "rows": rows, "wall_s": time.monotonic() - t_start}
    path = Path(__file__).with_name("serving_world.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
