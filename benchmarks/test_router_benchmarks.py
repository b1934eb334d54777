"""Router benchmarks (pytest-benchmark): balancer time and balance, encoder throughput, and the
router's overhead next to one denoising step.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_router_benchmarks.py \
        --benchmark-columns=mean,stddev,rounds --benchmark-sort=name

Set ``APTP_ROUTER_BENCH_MD=path.md`` to also write the markdown tables of benchmarks/RESULTS.md.

* balancers: B in {64, 1024, 8192} x K in {8, 16, 64}, skewed cosine-like scores (expert 0 is
  everyone's favourite by +0.8); balance = max/min expert load of the hard assignment (``inf`` when
  an expert gets nothing) and normalised entropy of the load (1 = perfectly even).
* encoder: all-MiniLM-L6-v2 on PartiPrompts (/work/shared/data/PartiPrompts.tsv, 1,632 prompts;
  generated prompts when absent), with an empty cache and with every prompt cached.
* overhead: encode (uncached) + APTP router (predictor + codes for an SD2.1-sized unit space,
  U = 1,620) + Sinkhorn for a batch of 16 prompts, vs one forward of the tiny SD2.1-shaped UNet
  (aptp backbone ``unet``, preset ``tiny``: 32x32x4 latent, 77 text tokens) at batch 16.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from aptp.core.units import UnitGroup, UnitSpace
from aptp.routers.balancers import EmdBalancer, GreedyBalancer, PotSinkhornBalancer, SinkhornBalancer
from aptp.routers.encoder import SentenceTransformerConfig, SentenceTransformerEncoder
from aptp.routers.ot import OTRouter, OTRouterConfig

PARTI = Path("/work/shared/data/PartiPrompts.tsv")
BALANCERS = {"sinkhorn": SinkhornBalancer, "pot": PotSinkhornBalancer, "emd": EmdBalancer, "greedy": GreedyBalancer}
SIZES = [(B, K) for B in (64, 1024, 8192) for K in (8, 16, 64)]
ROWS: dict[str, list[dict]] = {"balancer": [], "encoder": [], "overhead": []}


def skewed(B: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(B * 1000 + K)
    s = torch.rand(B, K, generator=g) * 2 - 1
    s[:, 0] += 0.8
    return s.clamp(-1, 1)


def balance(ids: torch.Tensor, K: int) -> tuple[float, float]:
    load = torch.bincount(ids, minlength=K).double()
    ratio = float(load.max() / load.min()) if load.min() > 0 else math.inf
    p = load / load.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(K)) if K > 1 else 1.0
    return ratio, entropy


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("B,K", SIZES, ids=[f"B{B}-K{K}" for B, K in SIZES])
@pytest.mark.parametrize("name", list(BALANCERS))
def test_balancer(benchmark, name, B, K):
    s = skewed(B, K)
    bal = BALANCERS[name]()
    rounds = 3 if B * K >= 8192 * 16 else 10
    ids = benchmark.pedantic(bal.assign, args=(s,), rounds=rounds, iterations=1, warmup_rounds=1)
    q = bal.plan(s)
    ratio, entropy = balance(ids, K)
    arg_ratio, arg_entropy = balance(q.argmax(1), K)
    col_err = float((q.sum(0) * K - 1).abs().max())
    info = {"balancer": name, "B": B, "K": K, "ms": benchmark.stats.stats.mean * 1e3, "max_min": ratio,
            "entropy": entropy, "argmax_max_min": arg_ratio, "argmax_entropy": arg_entropy, "col_err": col_err}
    benchmark.extra_info.update(info)
    ROWS["balancer"].append(info)
    assert torch.isfinite(q).all()


def _prompts() -> tuple[list[str], str]:
    if PARTI.is_file():
        from aptp.data.prompts import read_prompts

        return read_prompts(PARTI), "PartiPrompts"
    colors, things = ["red", "blue", "green", "yellow"], ["cube", "sphere", "dog", "car", "tree", "house"]
    return [f"a {c} {t} number {i}" for i in range(300) for c in colors for t in things][:1632], "generated"


@pytest.fixture(scope="module")
def encoder():
    enc = SentenceTransformerEncoder(SentenceTransformerConfig(progress=False))
    _ = enc.dim
    return enc


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_encoder_throughput(benchmark, encoder, cached):
    prompts, source = _prompts()
    if cached:
        encoder.encode(prompts)
        setup = None
    else:
        def setup():
            encoder.clear_cache()
    benchmark.pedantic(encoder.encode, args=(prompts,), setup=setup, rounds=2 if not cached else 10,
                       iterations=1, warmup_rounds=0 if not cached else 1)
    rate = len(prompts) / benchmark.stats.stats.mean
    info = {"cache": "warm" if cached else "empty", "prompts": len(prompts), "source": source,
            "s": benchmark.stats.stats.mean, "prompts_per_s": rate}
    benchmark.extra_info.update(info)
    ROWS["encoder"].append(info)


def sd21_sized_unit_space() -> UnitSpace:
    """1,606 width units + 14 depth units (the paper's SD2.1 count), in 52 groups."""
    groups = [UnitGroup("resnet_channels", f"resnet.{i}", 32, 1e6, 100) for i in range(44)]
    groups += [UnitGroup("attention_heads", f"attn.{i}", 20, 1e6, 100) for i in range(7)]
    groups += [UnitGroup("attention_heads", "attn.7", 58, 1e6, 100)]
    groups += [UnitGroup("depth", "depth", 14, 1e7, 1000, unit_paths=tuple(f"block.{i}" for i in range(14)))]
    return UnitSpace(tuple(groups), total_macs=3e9, total_params=10**6)


def _time(fn, rounds: int) -> float:
    fn()
    t = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2]


def test_router_overhead_vs_denoising_step(benchmark, encoder):
    from aptp.core.plugins import default_registry

    B = 16
    prompts, _ = _prompts()
    batch = prompts[100:100 + B]
    space = sd21_sized_unit_space()
    assert space.size == 1620
    router = OTRouter(OTRouterConfig(num_experts=8)).bind(space, encoder.dim).eval()
    sinkhorn = SinkhornBalancer()

    def route():
        encoder.clear_cache()
        with torch.no_grad():
            return router.route(encoder.encode(batch), sinkhorn)

    benchmark.pedantic(route, rounds=5, iterations=1, warmup_rounds=1)
    t_route = benchmark.stats.stats.mean
    with torch.no_grad():
        z = encoder.encode(batch)
        t_router_only = _time(lambda: router.route(z, sinkhorn), 20)

    spec = default_registry()["backbone"].get("unet")
    backbone = spec.build(spec.config_class(preset="tiny"))
    unet = backbone.build_denoiser()
    cond = backbone.conditioning()
    sample = torch.randn(B, *cond.sample_shape)
    text = torch.randn(B, cond.text_len, cond.text_dim)
    t = torch.full((B,), 500)
    with torch.no_grad():
        t_step = _time(lambda: backbone.denoise(unet, sample, t, text), 3)
    info = {"batch": B, "route_ms": t_route * 1e3, "router_only_ms": t_router_only * 1e3,
            "tiny_unet_step_ms": t_step * 1e3, "route_over_step": t_route / t_step,
            "router_only_over_step": t_router_only / t_step,
            "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6}
    benchmark.extra_info.update(info)
    ROWS["overhead"].append(info)


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.3g}"


def markdown() -> str:
    out = ["| balancer | B | K | time (ms) | max/min load | load entropy | argmax-of-plan max/min | "
           "argmax entropy | column error |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(ROWS["balancer"], key=lambda r: (r["balancer"], r["B"], r["K"])):
        out.append(f"| {r['balancer']} | {r['B']} | {r['K']} | {r['ms']:.2f} | {_fmt(r['max_min'])} | "
                   f"{r['entropy']:.4f} | {_fmt(r['argmax_max_min'])} | {r['argmax_entropy']:.4f} | "
                   f"{r['col_err']:.2g} |")
    out += ["", "| encoder cache | prompts | source | time (s) | prompts/s |", "|---|---:|---|---:|---:|"]
    for r in ROWS["encoder"]:
        out.append(f"| {r['cache']} | {r['prompts']} | {r['source']} | {r['s']:.3f} | {r['prompts_per_s']:.0f} |")
    out += ["", "| batch | encode+route+sinkhorn (ms) | router+sinkhorn only (ms) | tiny UNet step (ms) | "
            "route / step | router only / step |", "|---:|---:|---:|---:|---:|---:|"]
    for r in ROWS["overhead"]:
        out.append(f"| {r['batch']} | {r['route_ms']:.1f} | {r['router_only_ms']:.2f} | {r['tiny_unet_step_ms']:.1f} | "
                   f"{r['route_over_step']:.3f} | {r['router_only_over_step']:.4f} |")
    return "\n".join(out) + "\n"


def teardown_module(module) -> None:
    path = os.environ.get("APTP_ROUTER_BENCH_MD")
    if path and any(ROWS.values()):
        Path(path).write_text(markdown())
