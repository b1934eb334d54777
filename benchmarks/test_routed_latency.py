"""The batch-parallelism claim, measured: a routed mixed batch spread over K experts vs a static
model of the same mean kept MACs on the same batch, per denoising step (pytest-benchmark).

Experts keep uniform fractions of every width group at ratios spread around the budget (mean =
budget); the static model keeps the budget itself. A batch of B prompts is split evenly over the
K experts (B/K each, one call per expert: APTP's grouping) vs one call of the static model on
all B. Also the dense model on all B, and the router's overhead (encode + route) against one
25-step generation. On CPU the ratios use thread CPU time (one torch thread), min over rounds.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_routed_latency.py --benchmark-json=benchmarks/routed_latency_small.json

Environment: APTP_BENCH_PRESET (small | tiny, default small), APTP_BENCH_RESOLUTION (default 128 for
small), APTP_BENCH_DEVICE (cpu | cuda), APTP_WRITE_RESULTS=1 rewrites this section of RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import pytest
import torch
from _results import update_section
from _setup import BUDGET, DEVICE, PRESET, ROUTED_RATIOS, WidthExperts, bench_backbone


EXPERT_RATIOS = ROUTED_RATIOS
BATCHES = (4, 16)
ROUNDS = 3
CPU: dict[tuple[str, int], float] = {}
MARK_START, MARK_END = f"<!-- routed_latency[{PRESET}]:start -->", f"<!-- routed_latency[{PRESET}]:end -->"


@pytest.fixture(scope="module")
def models():
    bb = bench_backbone()
    cond = bb.conditioning()
    dense = bb.build_denoiser().eval()
    width = WidthExperts(dense, cond)
    cut = [width.cut(r) for r in EXPERT_RATIOS]
    experts, ratios = [m.to(DEVICE) for m, _ in cut], [r for _, r in cut]
    static, static_ratio = width.cut(BUDGET)
    out = {"cond": cond, "dense": dense.to(DEVICE), "experts": experts, "static": static.to(DEVICE),
           "expert_ratios": ratios, "static_ratio": static_ratio, "space": width.space}
    if DEVICE == "cpu":
        torch.set_num_threads(1)
        for b in BATCHES:
            for name in ("dense", "static", "routed"):
                CPU[(name, b)] = min(_cpu_time(_runner(out, name, b)) for _ in range(ROUNDS))
    yield out
    _report(out)


def _inputs(cond, batch):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *cond.sample_shape, generator=g).to(DEVICE), torch.full((batch,), 500, device=DEVICE),
            torch.randn(batch, cond.text_len, cond.text_dim, generator=g).to(DEVICE))


def _runner(m, name, batch):
    x, t, text = _inputs(m["cond"], batch)
    k = len(m["experts"])

    def run():
        with torch.inference_mode():
            if name == "routed":  # B/K prompts per expert, one call each (remainder to the first experts)
                for i, chunk in enumerate(torch.arange(batch).tensor_split(k)):
                    if len(chunk):
                        m["experts"][i](x[chunk], t[chunk], encoder_hidden_states=text[chunk], return_dict=False)
            else:
                m[name](x, t, encoder_hidden_states=text, return_dict=False)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def _cpu_time(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["dense", "static", "routed"])
def test_step_latency(benchmark, models, name, batch):
    benchmark.extra_info.update(model=name, batch=batch, preset=PRESET, device=DEVICE,
                                cpu_time_min_s=CPU.get((name, batch)))
    benchmark.pedantic(_runner(models, name, batch), rounds=3, warmup_rounds=1, iterations=1)


def test_router_overhead(benchmark, models):
    """Encode + route 16 prompts (MiniLM + an SD2.1-sized ot router) vs one 25-step generation."""
    from aptp.routers.encoder import SentenceTransformerConfig, SentenceTransformerEncoder
    from aptp.routers.ot import OTRouter, OTRouterConfig

    encoder = SentenceTransformerEncoder(SentenceTransformerConfig(cache_size=0, progress=False))
    router = OTRouter(OTRouterConfig(num_experts=4)).bind(models["space"], encoder.dim).eval()
    prompts = [f"a {c} {s} at the {p}" for c in ("red", "blue") for s in ("circle", "square") for p in
               ("top", "bottom", "left", "right")]

    def route():
        with torch.inference_mode():
            router.route(encoder.encode(prompts))

    benchmark.pedantic(route, rounds=3, warmup_rounds=1, iterations=1)
    CPU[("router", 16)] = min(_cpu_time(route) for _ in range(ROUNDS))
    benchmark.extra_info.update(cpu_time_min_s=CPU[("router", 16)])


def _report(m) -> None:
    if ("dense", BATCHES[0]) not in CPU:
        return
    lines = ["| batch | dense (ms) | static @ %.2f (ms) | routed K=%d, mean %.2f (ms) | static / dense | routed / dense | routed / static |"
             % (m["static_ratio"], len(m["experts"]), sum(m["expert_ratios"]) / len(m["experts"])),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in BATCHES:
        d, s, r = (CPU[(n, b)] for n in ("dense", "static", "routed"))
        lines.append(f"| {b} | {d * 1e3:.1f} | {s * 1e3:.1f} | {r * 1e3:.1f} | {s / d:.3f} | {r / d:.3f} | {r / s:.3f} |")
    if ("router", 16) in CPU:
        gen = 25 * CPU[("routed", 16)]
        lines += ["", f"Router overhead: encode + route 16 prompts = {CPU[('router', 16)] * 1e3:.1f} ms CPU, "
                      f"{CPU[('router', 16)] / gen:.4f} of a 25-step routed generation of the same 16 prompts."]
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("APTP_WRITE_RESULTS") != "1":
        return
    import diffusers

    section = "\n".join([
        MARK_START,
        f"## Routed mixed batch vs static at equal mean MACs, preset `{PRESET}` (`benchmarks/test_routed_latency.py`)",
        "",
        f"- machine: {DEVICE}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one torch "
        f"thread; thread CPU time per denoising step, min over {ROUNDS} rounds (the machine was shared)",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- experts: kept-MACs ratios {', '.join(f'{r:.3f}' for r in m['expert_ratios'])}; static "
        f"{m['static_ratio']:.3f}; sample {m['cond'].sample_shape}",
        f"- command: `APTP_BENCH_PRESET={PRESET} APTP_WRITE_RESULTS=1 OMP_NUM_THREADS=1 python -m pytest "
        f"benchmarks/test_routed_latency.py --benchmark-json=benchmarks/routed_latency_{PRESET}.json`",
        "",
        table,
        MARK_END,
    ])
    update_section(MARK_START, MARK_END, section)
