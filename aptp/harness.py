"""Compare compositions on the same work: run each (resumably), generate the same evaluation
prompts with the dense model and with each pruned model, measure quality and latency, and write
one report with a table and figures.

    cells = {"aptp": [], "static": ["pruner=static", "router=single", "assignment=magnitude"]}
    compare("world", cells, EvalConfig(), "runs/demo")

``aptp compare`` and ``aptp ablate`` (a grid of overrides) are the command-line faces of this module.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from aptp.core.build import build
from aptp.core.config import load_experiment
from aptp.pipeline import RoutedPipeline

DONE_FILE = "summary.json"


@dataclass
class EvalConfig:
    """The shared evaluation every model of a comparison gets."""

    num_prompts: int = 64  # held-out prompts
    prompts_file: Optional[str] = None  # a prompt file (one per line / TSV with Prompt); None: the world's
    seed: int = 12345  # held-out world prompts and the generation noise
    steps: int = 25  # denoising steps
    guidance_scale: float = 1.0
    batch_size: int = 16  # most prompts one expert batch holds
    metrics: list[str] = field(default_factory=lambda: ["world_accuracy", "world_fd", "world_mmd"])
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    latency_repeats: int = 5
    grid_per_expert: int = 8  # images per expert in the report's grids

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.steps < 1 or self.batch_size < 1 or self.latency_repeats < 1:
            raise ValueError("num_prompts, steps, batch_size and latency_repeats must be >= 1.")


@dataclass
class EvalPrompts:
    prompts: list[str]
    reference: torch.Tensor | None  # (N, 3, H, W) in [0, 1]: the world's ground-truth renders
    difficulty: list[int] | None


def eval_prompts(cfg: EvalConfig, resolution: int) -> EvalPrompts:
    """The held-out prompts: from ``prompts_file``, or drawn from the world with their renders."""
    if cfg.prompts_file:
        from aptp.data.prompts import read_prompts

        return EvalPrompts(read_prompts(cfg.prompts_file)[: cfg.num_prompts], None, None)
    from aptp.data.world import World, WorldConfig

    samples = World(WorldConfig(image_size=resolution)).sample(cfg.num_prompts, seed=cfg.seed)
    import numpy as np

    ref = torch.stack([torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                       for s in samples])
    return EvalPrompts([s.caption for s in samples], ref, [s.difficulty for s in samples])


def dense_pipeline(run_dir: str | Path) -> RoutedPipeline:
    """The dense model of a run as a one-expert pipeline (same backbone, encoder, sampling code)."""
    from aptp.routers.single import SingleRouter

    pipe = RoutedPipeline.from_run(run_dir)
    return RoutedPipeline(pipe.backbone, pipe.modules, pipe.encoder, SingleRouter(), {0: pipe.modules.denoiser})


@torch.no_grad()
def step_latency_ms(pipe: RoutedPipeline, denoiser: torch.nn.Module, batch_size: int, repeats: int) -> float:
    """Median wall time (ms) of one denoiser call at ``batch_size`` (synchronised on CUDA)."""
    cond = pipe.backbone.conditioning()
    p = next(denoiser.parameters())
    x = torch.randn(batch_size, *cond.sample_shape, device=p.device, dtype=p.dtype)
    t = torch.full((batch_size,), 500, device=p.device)
    text = pipe.backbone.encode_prompts(pipe.modules, ["a red circle"] * batch_size).to(p.device, p.dtype)
    times = []
    for i in range(repeats + 1):  # the first call warms up
        if p.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe.backbone.denoise(denoiser, x, t, text)
        if p.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return float(torch.tensor(times).median())


def evaluate_pipeline(name: str, pipe: RoutedPipeline, prompts: EvalPrompts, cfg: EvalConfig,
                      metrics: Mapping[str, Any], kept_ratios: torch.Tensor | None) -> dict[str, Any]:
    """Generate the evaluation prompts, score them, time them."""
    from aptp.metrics.harness import evaluate

    for k in range(pipe.router.num_experts):  # load every expert before timing
        pipe.expert(k)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    out = pipe(prompts.prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
               generator=g, output_type="pt")
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"model": name, "num_experts": pipe.router.num_experts,
                           "seconds_per_image": seconds / len(prompts.prompts)}
    ids = out.expert_ids
    row["load"] = torch.bincount(ids, minlength=pipe.router.num_experts).tolist()
    if kept_ratios is not None:
        row["expert_macs_ratios"] = [round(float(r), 4) for r in kept_ratios]
        row["mean_macs_ratio"] = float(kept_ratios[ids].mean())
    else:
        row["mean_macs_ratio"] = 1.0
    if metrics:
        row.update(evaluate(out.images, prompts.prompts, metrics, reference=prompts.reference))
    if prompts.difficulty is not None and kept_ratios is not None and len(set(kept_ratios.tolist())) > 1:
        from scipy.stats import spearmanr

        rho = spearmanr(prompts.difficulty, kept_ratios[ids].tolist())
        row["difficulty_vs_macs_spearman"] = float(rho.statistic)
        row["difficulty_vs_macs_p"] = float(rho.pvalue)
    for b in cfg.latency_batch_sizes:
        lat = [step_latency_ms(pipe, pipe.expert(k), b, cfg.latency_repeats) for k in range(pipe.router.num_experts)]
        row[f"step_ms_b{b}"] = lat
    return {"row": row, "images": out.images, "expert_ids": ids}


def run_cell(base: str | Path, overrides: Sequence[str], out: Path) -> dict[str, Any]:
    """Run one composition into ``out`` unless it finished before (``summary.json`` exists) from
    the same config: a cell folder whose results came from another config (its ``fingerprint.json``
    differs) is refused with a ConfigError naming what changed, never silently reused."""
    from aptp.core.rundir import open_run

    with warnings.catch_warnings():  # a cell swapping a slot drops the base's settings for it: expected
        warnings.filterwarnings("ignore", message=r".* ignored: .* has no such parameter")
        cfg = load_experiment(base, list(overrides))
    hint = f"Delete {out} to run this cell again with its new config, or write to another --output-dir."
    done = out / DONE_FILE
    if done.is_file():
        with open_run(out, cfg, hint=hint):
            return json.loads(done.read_text())
    composition = build(cfg)
    with open_run(out, cfg, composition.registry, hint=hint):
        summary = composition.require("pruner").run(composition, out)
        done.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def compare(base: str | Path, cells: Mapping[str, Sequence[str]], cfg: EvalConfig, out_dir: str | Path,
            progress: bool = True) -> dict[str, Any]:
    """Run every cell, evaluate dense + every cell on the same prompts, write ``report.md``."""
    from aptp.metrics.harness import build_metrics
    from aptp.reporting import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, overrides in tqdm(list(cells.items()), desc="compositions", disable=not progress):
        summaries[name] = run_cell(base, overrides, out_dir / "cells" / name)
    first = out_dir / "cells" / next(iter(cells))
    dense = dense_pipeline(first)
    cond = dense.backbone.conditioning()
    prompts = eval_prompts(cfg, _pixel_resolution(dense, cond))
    metrics = build_metrics(cfg.metrics)
    results = {"dense": evaluate_pipeline("dense", dense, prompts, cfg, metrics, None)}
    for name in cells:
        run = out_dir / "cells" / name
        same_backbone = _backbone_section(run) == _backbone_section(first)
        pipe = RoutedPipeline.from_run(run, modules=dense.modules if same_backbone else None)
        results[name] = evaluate_pipeline(name, pipe, prompts, cfg, metrics, pipe.kept_ratios)
    rows = [r["row"] for r in results.values()]
    (out_dir / "results.json").write_text(json.dumps({"eval": asdict(cfg), "rows": rows,
                                                      "summaries": summaries}, indent=1, default=str) + "\n")
    report = write_report(out_dir, results, prompts, cfg, summaries)
    return {"rows": rows, "report": str(report)}


def _backbone_section(run_dir: Path) -> Any:
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").backbone)


def _pixel_resolution(pipe: RoutedPipeline, cond) -> int:
    vae = pipe.modules.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return cond.sample_shape[1] * factor


def grid_cells(grid: Sequence[str]) -> dict[str, list[str]]:
    """``["router=ot,kmeans", "router.num_experts=1,4"]`` -> one cell per combination, named
    ``router=ot,router.num_experts=1`` etc."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise ValueError(f"grid axis {item!r} must look like key=v1,v2 (e.g. router=ot,kmeans).")
        key, values = item.split("=", 1)
        vals = [v for v in values.split(",") if v]
        if not vals:
            raise ValueError(f"grid axis {item!r} has no values.")
        axes.append([f"{key}={v}" for v in vals])
    return {",".join(combo): list(combo) for combo in itertools.product(*axes)}


@dataclass
class ComparisonConfig:
    """A comparison file (``configs/comparison/<name>.yaml``): compositions side by side."""

    name: str = "comparison"
    base: str = "world"  # the experiment every cell starts from (name or YAML path)
    output_dir: str = "runs/${name}"
    cells: dict[str, list[str]] = field(default_factory=dict)  # cell name -> overrides of the base
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_comparison(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ComparisonConfig:
    """Read a comparison; ``overrides`` are ``eval.KEY=V``, ``name=V`` or ``CELL.KEY=V`` (appended
    to that cell's overrides)."""
    from omegaconf.errors import OmegaConfBaseException

    from aptp.core.config import config_search_path, find_preset
    from aptp.core.errors import ConfigError

    path = Path(name_or_path)
    if not path.suffix:
        path = find_preset("comparison", str(name_or_path), config_search_path())
    if not path.is_file():
        raise ConfigError(f"comparison file {path} does not exist.")
    raw = OmegaConf.load(path)
    own, cell_extra = [], {}
    for item in overrides:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head in raw.get("cells", {}) and "." in key:
            cell_extra.setdefault(head, []).append(item.split(".", 1)[1])
        else:
            own.append(item)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ComparisonConfig), raw, OmegaConf.from_dotlist(own))
        result = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not result.cells:
        raise ConfigError(f"{path}: 'cells' is empty; name at least one composition (cell name: [overrides]).")
    for cell, extra in cell_extra.items():
        result.cells[cell] = list(result.cells[cell]) + extra
    return result
