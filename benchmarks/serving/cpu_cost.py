"""CPU cost per image of a saturating burst through ExpertScheduler, before / after encoding each
prompt once (``reuse_text``), on the world setup of ``serving.py``; every candidate timed in the same
interleaved rounds by thread CPU time (``aptp.timing.time_interleaved``), so the figures hold on a
machine shared with other jobs (time spent waiting for a core is not counted).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/cpu_cost.py     # writes cpu_cost_world.json

One call = the 64-request trace of ``serving.py`` submitted at once and served by hand in the calling
thread (``poll(flush=True)``: full groups of ``max_batch`` first, then the rest: the groups a burst
gets); its thread CPU time / 64 = CPU ms per image, routing, encoding and every group included.
Candidates: the static model at 0.575 kept MACs (as in serving.py) and at the routed trace's
load-weighted mean kept MACs (equal mean MACs), routed K = 8 materialised and shared (r = 4); each
with ``reuse_text=False`` (before: the router encodes every prompt with MiniLM, then each group's
generation encodes its prompts with the backbone's MiniLM) and ``True`` (after: one encoding per
prompt at routing time, the routing embedding pooled from the backbone's token states).
``APTP_COST_ROUNDS`` (default 5) rounds.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _world import K, architectures, world_backbone  # noqa: E402
from serving import MAX_BATCH, MAX_WAIT, N, STEPS, prompts, shared_expert  # noqa: E402

from aptp.core.plugins import default_registry  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from aptp.pruners.gating import cut_model, uniform_architecture  # noqa: E402
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig  # noqa: E402
from aptp.routers.single import SingleRouter  # noqa: E402
from aptp.serving import ExpertScheduler  # noqa: E402
from aptp.timing import time_interleaved  # noqa: E402

ROUNDS = int(os.environ.get("APTP_COST_ROUNDS", "5"))


def uniform_at(space, target: float) -> torch.Tensor:
    """The uniform architecture whose kept-MACs ratio is closest to ``target`` (bisection on the keep ratio)."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float(space.macs_ratio(uniform_architecture(space, mid))) < target:
            lo = mid
        else:
            hi = mid
    cands = [uniform_architecture(space, r) for r in (lo, hi)]
    return min(cands, key=lambda a: abs(float(space.macs_ratio(a)) - target))


def main() -> None:
    torch.set_num_threads(1)
    t_start = time.monotonic()
    bb, _ = world_backbone()
    modules = bb.load()
    dense = modules.denoiser.eval()
    space, grans, archs, static_arch = architectures(dense, bb.conditioning())
    ratios = space.macs_ratio(archs)  # (K,)
    spec = default_registry()["encoder"].get("minilm")
    encoder = spec.build(spec.config_class(cache_size=0))  # every request pays its encoding (no cache)
    router = KMeansRouter(KMeansRouterConfig(num_experts=K, seed=0))
    router.fit(encoder.encode(prompts(256, seed=1)))
    trace = prompts(N, seed=2)
    routed = RoutedPipeline(bb, modules, encoder, router, {k: cut_model(dense, space, grans, archs[k]).eval() for k in range(K)})
    ids = routed.route(trace)
    routed_mean = float(ratios[ids].mean())
    equal_arch = uniform_at(space, routed_mean)
    pipes = {
        f"static @ {float(space.macs_ratio(static_arch)):.3f}": RoutedPipeline(
            bb, modules, encoder, SingleRouter(), {0: cut_model(dense, space, grans, static_arch).eval()}),
        f"static @ {float(space.macs_ratio(equal_arch)):.3f} (the uniform cut nearest routed's mean)": RoutedPipeline(
            bb, modules, encoder, SingleRouter(), {0: cut_model(dense, space, grans, equal_arch).eval()}),
        "routed K=8": routed,
        "routed K=8 shared (r=4)": RoutedPipeline(
            bb, modules, encoder, router, {k: shared_expert(dense, space, grans, archs[k], rank=4, seed=k) for k in range(K)}),
    }
    print(f"routed load {torch.bincount(ids, minlength=K).tolist()}, load-weighted mean kept MACs {routed_mean:.3f}", flush=True)
    stats: dict[str, dict] = {}

    def burst(name: str, reuse: bool):
        def call() -> None:
            server = ExpertScheduler(pipes[name], max_batch=MAX_BATCH, max_wait_s=MAX_WAIT, num_inference_steps=STEPS,
                                     reuse_text=reuse)
            futures = server.submit_many(trace, [torch.Generator().manual_seed(i) for i in range(len(trace))])
            server.poll(flush=True)
            assert all(f.done() for f in futures)
            s = server.stats
            stats[label(name, reuse)] = {"groups": len(s.groups), "mean_group": len(trace) / len(s.groups),
                                         "route_cpu_share": s.route_cpu_s / s.cpu_s, "pooled": s.pooled,
                                         "encoded": s.encoded}
        return call

    def label(name: str, reuse: bool) -> str:
        return f"{name} | {'encode once' if reuse else 'encode twice (before)'}"

    for p in pipes.values():  # warm-up: one group per expert, one step
        s = ExpertScheduler(p, max_batch=MAX_BATCH, max_wait_s=0.0, num_inference_steps=1)
        s.submit_many(trace[:16])
        s.poll(flush=True)
    candidates = {label(n, r): burst(n, r) for n in pipes for r in (False, True)}
    timings = time_interleaved(candidates, rounds=ROUNDS, repeats=1, warmup=0, threads=1)
    ref = next(k for k in timings if k.startswith("static @ 0.575") and "once" in k)
    rows = []
    for k, t in timings.items():
        per_image = [ms / len(trace) for ms in t.samples_ms]
        rows.append({"candidate": k, "cpu_ms_per_image_median": float(np.median(per_image)),
                     "cpu_ms_per_image_p25": float(np.quantile(per_image, 0.25)),
                     "cpu_ms_per_image_p75": float(np.quantile(per_image, 0.75)),
                     "cpu_throughput": 1000.0 / float(np.median(per_image)),
                     "throughput_vs_static_0575_once": timings[ref].median / t.median,
                     **stats[k]})
        print(rows[-1], flush=True)
    out = {"date": str(date.today()), "machine": f"cpu {platform.machine()}, {os.cpu_count()} cores, 1 torch thread, nice 19, "
           "measured under contention (two training jobs on the same 2 cores); thread CPU time",
           "versions": f"Python {platform.python_version()}, torch {torch.__version__}", "requests": len(trace), "steps": STEPS,
           "max_batch": MAX_BATCH, "rounds": ROUNDS, "routed_load_weighted_macs": routed_mean,
           "routed_load": torch.bincount(ids, minlength=K).tolist(), "rows": rows, "wall_s": time.monotonic() - t_start}
    path = Path(__file__).with_name("cpu_cost_world.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
