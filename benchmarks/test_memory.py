"""Memory of the dense model, the experts, a static model and K resident experts (pytest-benchmark
rows with the memory in ``extra_info``; not a unit test).

Per model: resident weight memory, and the activation peak of one denoising step at batch 1 / 4 / 16
(peak tensor memory above what was live at the call; :func:`_memory.peak_memory`); their sum is
what serving that model needs. ``routed`` is APTP
serving: K = 4 experts resident (mean kept MACs 0.6), the batch split over them, one call each.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_memory.py --benchmark-json=benchmarks/memory_small.json

Environment: APTP_BENCH_PRESET (small | tiny | sd21, default small), APTP_BENCH_RESOLUTION (default
128 for small), APTP_BENCH_DEVICE (cpu | cuda), APTP_BENCH_DTYPE (float32 | float16),
APTP_WRITE_RESULTS=1 rewrites this section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys

import pytest
import torch
from _memory import peak_memory, weight_bytes
from _results import update_section
from _setup import DEVICE, DTYPE, PRESET, ROUTED_RATIOS, WidthExperts, bench_backbone


BATCHES = (1, 4, 16)
SINGLE = {"dense": 1.0, "expert 0.8": 0.8, "static 0.6": 0.6, "expert 0.4": 0.4}
ROUTED = ROUTED_RATIOS  # all resident
ROWS: dict[tuple[str, int], dict[str, float]] = {}
MIB = 2**20
MARK_START, MARK_END = f"<!-- memory[{PRESET}]:start -->", f"<!-- memory[{PRESET}]:end -->"


@pytest.fixture(scope="module")
def models():
    bb = bench_backbone()
    cond = bb.conditioning()
    dense = bb.build_denoiser().eval()
    width = WidthExperts(dense, cond)

    def cut(r: float):
        model, ratio = width.cut(r)
        return model.to(DEVICE, DTYPE), ratio

    out = {name: cut(r) for name, r in SINGLE.items() if r < 1.0}
    out["dense"] = (dense.to(DEVICE, DTYPE), 1.0)
    routed = [cut(r) for r in ROUTED]
    out["routed"] = ([m for m, _ in routed], sum(r for _, r in routed) / len(routed))
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield cond, out
    _report(cond)


def _step(cond, model, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *cond.sample_shape, generator=g).to(DEVICE, DTYPE)  # (B, C, H, W)
    t = torch.full((batch,), 500, device=DEVICE)  # (B,)
    text = torch.randn(batch, cond.text_len, cond.text_dim, generator=g).to(DEVICE, DTYPE)  # (B, L, D)
    experts = model if isinstance(model, list) else [model]

    def run() -> None:
        with torch.inference_mode():
            for m, rows in zip(experts, torch.arange(batch).tensor_split(len(experts))):
                if len(rows):  # routed: B/K prompts per expert, one call each
                    m(x[rows], t[rows], encoder_hidden_states=text[rows], return_dict=False)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", [*SINGLE, "routed"])
def test_step_memory(benchmark, models, name, batch):
    cond, out = models
    model, macs_ratio = out[name]
    run = _step(cond, model, batch)
    before, peak = peak_memory(run, DEVICE)
    weights = sum(weight_bytes(m) for m in (model if isinstance(model, list) else [model]))
    # total = resident weights + the step's activation peak (CPU's timeline sees only the weights a
    # call touches, CUDA's counters every model on the device, so neither's absolute peak is this model's)
    row = {"macs_ratio": macs_ratio, "weights_mib": weights / MIB, "activation_peak_mib": (peak - before) / MIB,
           "total_mib": (weights + peak - before) / MIB}
    ROWS[(name, batch)] = row
    benchmark.extra_info.update(model=name, batch=batch, preset=PRESET, device=DEVICE, dtype=str(DTYPE), **row)
    benchmark.pedantic(run, rounds=2, warmup_rounds=1, iterations=1)
    assert row["weights_mib"] > 0 and peak >= before


def _report(cond) -> None:
    if not ROWS:
        return
    dense_w = ROWS.get(("dense", BATCHES[0]), {}).get("weights_mib")
    lines = ["| model | MACs ratio | weights (MiB) | weights / dense | batch | activation peak (MiB) "
             "| weights + activations (MiB) | total / dense total |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in [*SINGLE, "routed"]:
        for b in BATCHES:
            r = ROWS.get((name, b))
            if r is None:
                continue
            d = ROWS.get(("dense", b))
            label = f"routed (K={len(ROUTED)} resident)" if name == "routed" else name
            lines.append(f"| {label} | {r['macs_ratio']:.3f} | {r['weights_mib']:.1f} | "
                         f"{r['weights_mib'] / dense_w:.2f} | {b} | {r['activation_peak_mib']:.1f} | {r['total_mib']:.1f} | "
                         f"{r['total_mib'] / d['total_mib']:.2f} |" if d and dense_w else "")
    table = "\n".join(line for line in lines if line)
    print("\n" + table)
    if os.environ.get("APTP_WRITE_RESULTS") != "1":
        return
    import diffusers

    how = ("CUDA caching allocator (torch.cuda.max_memory_allocated)" if DEVICE.startswith("cuda")
           else "torch profiler memory timeline (tensors on CPU, not process RSS)")
    section = "\n".join([
        MARK_START,
        f"## Memory: dense, experts, static and K resident experts, preset `{PRESET}` (`benchmarks/test_memory.py`)",
        "",
        f"- machine: {DEVICE}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {DTYPE}",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- measured with the {how}; sample {cond.sample_shape}, {cond.text_len} tokens; one denoising step",
        f"- routed: experts at kept-MACs ratios {', '.join(f'{r:.2f}' for r in ROUTED)} all resident, the batch "
        "split evenly, one call each",
        f"- command: `APTP_BENCH_PRESET={PRESET} APTP_WRITE_RESULTS=1 OMP_NUM_THREADS=1 python -m pytest "
        f"benchmarks/test_memory.py --benchmark-json=benchmarks/memory_{PRESET}.json`",
        "",
        table,
        MARK_END,
    ])
    update_section(MARK_START, MARK_END, section)
