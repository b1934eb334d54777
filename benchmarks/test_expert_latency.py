"""Latency of physically cut experts vs their kept-MACs ratio (pytest-benchmark; not a unit test).

Experts keep the same fraction of every width unit group (ResNet channel groups, attention heads,
FFN groups; :func:`aptp.pruners.gating.uniform_architecture`) so that their analytic MACs are
0.9 ... 0.4 of the dense model's; the dense model is ratio 1.0. Goal: latency ratio <= 1.1 x MACs ratio.
On CPU the ratios use the *thread CPU time* (``time.thread_time``, one torch thread) of each call,
minimum over rounds that interleave all experts: on a shared machine wall time mostly measures the
neighbours. Wall-clock times (pytest-benchmark's JSON, and the table's min/median) are reported too.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_expert_latency.py --benchmark-json=benchmarks/expert_latency_small.json

Environment: ``APTP_BENCH_PRESET`` (small | tiny | sd21, default small: SD2.1's layout at 0.4 x width,
whose cost mix at 128 px resembles SD2.1's at 256 px), ``APTP_BENCH_RESOLUTION`` (pixels, default 128
for small, else the preset's), ``APTP_BENCH_DEVICE`` (cpu | cuda, default cpu), ``APTP_BENCH_BATCHES``
(default "1,8"), ``APTP_WRITE_RESULTS=1`` rewrites this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import pytest
import torch
from _results import update_section
from _setup import DEVICE, PRESET, WidthExperts, bench_backbone


RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
BATCHES = tuple(int(b) for b in os.environ.get("APTP_BENCH_BATCHES", "1,8").split(","))
THREADS = int(os.environ.get("APTP_BENCH_THREADS", "1"))
INTERLEAVED_ROUNDS = int(os.environ.get("APTP_BENCH_ROUNDS", "3"))
RESULTS: dict[tuple[int, float], dict[str, float]] = {}
CPU_TIME: dict[tuple[int, float], float] = {}
MARK_START, MARK_END = f"<!-- expert_latency[{PRESET}]:start -->", f"<!-- expert_latency[{PRESET}]:end -->"


@pytest.fixture(scope="module")
def experts():
    bb = bench_backbone()
    cond = bb.conditioning()
    width = WidthExperts(bb.build_denoiser(), cond)
    space = width.space
    models = {}
    for r in RATIOS:
        model, macs_ratio = width.cut(r)
        models[r] = (model.to(DEVICE), macs_ratio)
    if DEVICE == "cpu":
        torch.set_num_threads(THREADS)
        _interleaved_cpu_times(cond, models)
    yield cond, space, models
    _report(cond, space)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_expert_latency(benchmark, experts, ratio, batch):
    cond, space, models = experts
    model, macs_ratio = models[ratio]
    x, t, text = _inputs(cond, batch)

    def run() -> None:
        with torch.inference_mode():
            model(x, t, encoder_hidden_states=text, return_dict=False)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()  # pytest-benchmark's timer does not wait for the GPU

    benchmark.extra_info.update(target_ratio=ratio, macs_ratio=macs_ratio, batch=batch, preset=PRESET,
                                gmacs_per_sample=macs_ratio * space.total_macs / 1e9, device=DEVICE,
                                cpu_time_min_s=CPU_TIME.get((batch, ratio)))
    benchmark.pedantic(run, rounds=3 if batch > 1 else 8, warmup_rounds=2, iterations=1)
    st = benchmark.stats.stats
    RESULTS[(batch, ratio)] = {"min": st.min, "median": st.median, "macs_ratio": macs_ratio}


def _inputs(cond, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *cond.sample_shape, generator=g).to(DEVICE)  # (B, C, H, W)
    t = torch.full((batch,), 500, device=DEVICE)  # (B,)
    text = torch.randn(batch, cond.text_len, cond.text_dim, generator=g).to(DEVICE)  # (B, L, D)
    return x, t, text


def _interleaved_cpu_times(cond, models) -> None:
    """Min thread-CPU time per call of every expert, rounds interleaving all experts."""
    for batch in BATCHES:
        x, t, text = _inputs(cond, batch)
        with torch.inference_mode():
            for _ in range(INTERLEAVED_ROUNDS):
                for r, (model, _) in models.items():
                    t0 = time.thread_time()
                    model(x, t, encoder_hidden_states=text, return_dict=False)
                    dt = time.thread_time() - t0
                    CPU_TIME[(batch, r)] = min(CPU_TIME.get((batch, r), float("inf")), dt)


def _report(cond, space) -> None:
    if not RESULTS:
        return
    lines = [
        "| batch | target | MACs ratio | GMACs/sample | CPU time (ms) | wall min (ms) | wall median (ms) "
        "| latency ratio | latency / MACs ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in BATCHES:
        base = RESULTS.get((batch, 1.0))
        for r in RATIOS:
            row = RESULTS.get((batch, r))
            if row is None or base is None:
                continue
            cpu = CPU_TIME.get((batch, r))
            lat = cpu / CPU_TIME[(batch, 1.0)] if cpu is not None else row["min"] / base["min"]
            lines.append(f"| {batch} | {r:.1f} | {row['macs_ratio']:.3f} | {row['macs_ratio'] * space.total_macs / 1e9:.3f} | "
                         f"{(cpu or float('nan')) * 1e3:.1f} | {row['min'] * 1e3:.1f} | {row['median'] * 1e3:.1f} | "
                         f"{lat:.3f} | {lat / row['macs_ratio']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("APTP_WRITE_RESULTS") != "1":
        return
    import diffusers

    proc = platform.processor() or platform.machine()
    section = "\n".join([
        MARK_START,
        f"## Expert latency vs kept-MACs ratio, preset `{PRESET}` (`benchmarks/test_expert_latency.py`)",
        "",
        f"- machine: {DEVICE}, {proc}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} "
        "(shared with other jobs while measured: latency ratio = ratio of thread CPU times, min over "
        f"{INTERLEAVED_ROUNDS} interleaved rounds; wall times for reference)",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- model: preset `{PRESET}`, sample {cond.sample_shape}, {cond.text_len} tokens, dense "
        f"{space.total_macs / 1e9:.3f} GMACs/sample; experts keep a uniform fraction of every width group",
        f"- command: `APTP_BENCH_PRESET={PRESET} APTP_WRITE_RESULTS=1 OMP_NUM_THREADS=1 python -m pytest benchmarks/test_expert_latency.py "
        f"--benchmark-json=benchmarks/expert_latency_{PRESET}.json`",
        "- goal: latency ratio <= 1.1 x MACs ratio (last column <= 1.1)",
        "",
        table,
        MARK_END,
    ])
    update_section(MARK_START, MARK_END, section)
