"""Latency of physically cut experts vs their kept-MACs ratio (pytest-benchmark; not a unit test).

Experts keep the same fraction of every width unit group (ResNet channel groups, attention heads,
FFN groups; :func:`aptp.pruners.gating.uniform_architecture`) so that their analytic MACs are
0.9 ... 0.4 of the dense model's; the dense model is ratio 1.0. Goal: latency ratio <= 1.1 x MACs ratio.
Ratios use the *minimum* over rounds: on a shared CPU the median mostly measures the neighbours.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_expert_latency.py --benchmark-json=benchmarks/expert_latency.json

Environment: ``APTP_BENCH_PRESET`` (tiny | sd21, default tiny), ``APTP_BENCH_RESOLUTION`` (pixels,
default: the preset's), ``APTP_BENCH_DEVICE`` (cpu | cuda, default cpu), ``APTP_BENCH_BATCHES``
(default "1,8"), ``APTP_WRITE_RESULTS=1`` rewrites this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.pruners.gating import build_unit_space, cut_model, uniform_architecture
from aptp.pruners.granularities import (
    FFN,
    AttentionHeads,
    AttentionHeadsConfig,
    FFNConfig,
    ResnetChannels,
    ResnetChannelsConfig,
)

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
BATCHES = tuple(int(b) for b in os.environ.get("APTP_BENCH_BATCHES", "1,8").split(","))
PRESET = os.environ.get("APTP_BENCH_PRESET", "tiny")
RESOLUTION = int(os.environ["APTP_BENCH_RESOLUTION"]) if "APTP_BENCH_RESOLUTION" in os.environ else None
DEVICE = os.environ.get("APTP_BENCH_DEVICE", "cpu")
RESULTS: dict[tuple[int, float], dict[str, float]] = {}
MARK_START, MARK_END = "<!-- expert_latency:start -->", "<!-- expert_latency:end -->"


@pytest.fixture(scope="module")
def experts():
    bb = UNetBackbone(UNetBackboneConfig(preset=PRESET, resolution=RESOLUTION))
    cond = bb.conditioning()
    dense = bb.build_denoiser()
    grans = [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig())]
    space = build_unit_space(dense, grans, cond)
    models = {}
    for r in RATIOS:
        arch = uniform_architecture(space, r)
        models[r] = (cut_model(dense, space, grans, arch).to(DEVICE), float(space.macs_ratio(arch)))
    yield cond, space, models
    _report(cond, space)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_expert_latency(benchmark, experts, ratio, batch):
    cond, space, models = experts
    model, macs_ratio = models[ratio]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *cond.sample_shape, generator=g).to(DEVICE)
    t = torch.full((batch,), 500, device=DEVICE)
    text = torch.randn(batch, cond.text_len, cond.text_dim, generator=g).to(DEVICE)

    def run() -> None:
        with torch.inference_mode():
            model(x, t, encoder_hidden_states=text, return_dict=False)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()  # pytest-benchmark's timer does not wait for the GPU

    benchmark.extra_info.update(target_ratio=ratio, macs_ratio=macs_ratio, batch=batch, preset=PRESET,
                                gmacs_per_sample=macs_ratio * space.total_macs / 1e9, device=DEVICE)
    benchmark.pedantic(run, rounds=6 if batch > 1 else 15, warmup_rounds=2, iterations=1)
    st = benchmark.stats.stats
    RESULTS[(batch, ratio)] = {"min": st.min, "median": st.median, "macs_ratio": macs_ratio}


def _report(cond, space) -> None:
    if not RESULTS:
        return
    lines = [
        "| batch | target | MACs ratio | GMACs/sample | min latency (ms) | median (ms) | latency ratio (min) | latency / MACs ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in BATCHES:
        base = RESULTS.get((batch, 1.0))
        for r in RATIOS:
            row = RESULTS.get((batch, r))
            if row is None or base is None:
                continue
            lat = row["min"] / base["min"]
            lines.append(f"| {batch} | {r:.1f} | {row['macs_ratio']:.3f} | {row['macs_ratio'] * space.total_macs / 1e9:.3f} | "
                         f"{row['min'] * 1e3:.1f} | {row['median'] * 1e3:.1f} | {lat:.3f} | {lat / row['macs_ratio']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("APTP_WRITE_RESULTS") != "1":
        return
    import diffusers

    cpu = platform.processor() or platform.machine()
    section = "\n".join([
        MARK_START,
        "## Expert latency vs kept-MACs ratio (`benchmarks/test_expert_latency.py`)",
        "",
        f"- machine: {DEVICE}, {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} "
        "(shared with other jobs while measured)",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- model: preset `{PRESET}`, sample {cond.sample_shape}, {cond.text_len} tokens, dense "
        f"{space.total_macs / 1e9:.3f} GMACs/sample; experts keep a uniform fraction of every width group",
        "- command: `APTP_WRITE_RESULTS=1 OMP_NUM_THREADS=1 python -m pytest benchmarks/test_expert_latency.py "
        "--benchmark-json=benchmarks/expert_latency.json`",
        "- goal: latency ratio <= 1.1 x MACs ratio (last column <= 1.1)",
        "",
        table,
        MARK_END,
    ])
    path = Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
