"""Full-generation latency: prompts -> images (text encoder, N denoising steps, VAE decode) with the
dense model, a static model at the budget and K routed experts of the same mean kept MACs
(pytest-benchmark; not a unit test).

``routed`` is what :class:`aptp.pipeline.RoutedPipeline` does after routing: the batch split
evenly over K = 4 experts (kept-MACs ratios 0.45 / 0.55 / 0.65 / 0.75, mean 0.6), one generation
per expert; the router's own cost is in test_routed_latency.py. On CPU the ratios use thread CPU
time (one torch thread), min over rounds.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_generation_latency.py --benchmark-json=benchmarks/generation_latency_small.json

Environment: APTP_BENCH_PRESET (small | tiny | sd21, default small), APTP_BENCH_RESOLUTION (default
128 for small), APTP_BENCH_DEVICE (cpu | cuda), APTP_BENCH_DTYPE (float32 | float16),
APTP_BENCH_STEPS (default 25), APTP_BENCH_BATCHES (default "1,4,16"), APTP_WRITE_RESULTS=1
rewrites this section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import pytest
import torch
from _results import update_section
from _setup import BUDGET, DEVICE, DTYPE, PRESET, ROUTED_RATIOS, WidthExperts, bench_backbone


STEPS = int(os.environ.get("APTP_BENCH_STEPS", "25"))
BATCHES = tuple(int(b) for b in os.environ.get("APTP_BENCH_BATCHES", "1,4,16").split(","))
ROUTED = ROUTED_RATIOS
ROUNDS = 2
CPU: dict[tuple[str, int], float] = {}
MARK_START, MARK_END = f"<!-- generation_latency[{PRESET}]:start -->", f"<!-- generation_latency[{PRESET}]:end -->"


@pytest.fixture(scope="module")
def setup():
    bb = bench_backbone()
    modules = bb.load(DEVICE, DTYPE)
    dense = modules.denoiser.eval()
    width = WidthExperts(dense, bb.conditioning())
    static, static_ratio = width.cut(BUDGET)
    routed = [width.cut(r) for r in ROUTED]
    models = {"dense": ([dense], 1.0), "static": ([static], static_ratio),
              "routed": ([m for m, _ in routed], sum(r for _, r in routed) / len(routed))}
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield bb, modules, models
    _report(bb, models)


def _runner(bb, modules, experts, batch: int):
    """The timed call and what to divide its time by: a batch smaller than K runs on every expert in
    turn (the expected latency of prompts routed to any expert is the mean over experts)."""
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    k = len(experts)
    chunks = [torch.arange(batch)] * k if batch < k else list(torch.arange(batch).tensor_split(k))

    def run() -> None:
        with torch.inference_mode():
            for m, rows in zip(experts, chunks):
                g = torch.Generator().manual_seed(0)
                bb.generate(modules, [prompts[i] for i in rows], denoiser=m, num_inference_steps=STEPS,
                            generator=g)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()  # pytest-benchmark's timer does not wait for the GPU

    return run, (k if batch < k else 1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["dense", "static", "routed"])
def test_generation_latency(benchmark, setup, name, batch):
    bb, modules, models = setup
    experts, macs_ratio = models[name]
    run, per = _runner(bb, modules, experts, batch)
    run()  # warm-up
    if DEVICE == "cpu":
        times = []
        for _ in range(ROUNDS):
            t0 = time.thread_time()
            run()
            times.append(time.thread_time() - t0)
        CPU[(name, batch)] = min(times) / per
    benchmark.extra_info.update(model=name, batch=batch, steps=STEPS, macs_ratio=macs_ratio, preset=PRESET,
                                device=DEVICE, cpu_time_min_s=CPU.get((name, batch)), runs_per_call=per)
    benchmark.pedantic(run, rounds=1 if DEVICE == "cpu" else 3, iterations=1)
    CPU.setdefault((name, batch), benchmark.stats.stats.min / per)  # on GPU: synchronised wall time


def _report(bb, models) -> None:
    if not any(("dense", b) in CPU for b in BATCHES):
        return
    lines = [f"| batch | dense (s) | static @ {models['static'][1]:.2f} (s) | routed K={len(ROUTED)}, mean "
             f"{models['routed'][1]:.2f} (s) | static / dense | routed / dense | routed / static |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in BATCHES:
        if not all((n, b) in CPU for n in ("dense", "static", "routed")):
            continue
        d, s, r = (CPU[(n, b)] for n in ("dense", "static", "routed"))
        lines.append(f"| {b} | {d:.2f} | {s:.2f} | {r:.2f} | {s / d:.3f} | {r / d:.3f} | {r / s:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("APTP_WRITE_RESULTS") != "1":
        return
    import diffusers

    timing = ("thread CPU time, one torch thread, min over 2 rounds after a warm-up" if DEVICE == "cpu"
              else "wall time synchronised with the device, min over 3 rounds after a warm-up")
    section = "\n".join([
        MARK_START,
        f"## Full generation: dense vs static vs routed experts, preset `{PRESET}` (`benchmarks/test_generation_latency.py`)",
        "",
        f"- machine: {DEVICE}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {DTYPE}; {timing}",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- generation: text encoder + {STEPS} denoising steps + VAE decode, sample {bb.conditioning().sample_shape}; "
        f"routed = the batch split evenly over experts at kept-MACs {', '.join(f'{r:.2f}' for r in ROUTED)} "
        "(a batch smaller than K: the mean over the experts)",
        f"- command: `APTP_BENCH_PRESET={PRESET} APTP_WRITE_RESULTS=1 OMP_NUM_THREADS=1 python -m pytest "
        f"benchmarks/test_generation_latency.py --benchmark-json=benchmarks/generation_latency_{PRESET}.json`",
        "",
        table,
        MARK_END,
    ])
    update_section(MARK_START, MARK_END, section)
