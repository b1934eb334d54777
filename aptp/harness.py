"""Compare compositions on the same work: run each (resumably), generate the same evaluation
prompts with the dense model and with each pruned model, measure quality and latency, and write
one report with a table and figures.

    cells = {"aptp": [], "static": ["pruner=static", "router=single", "assignment=magnitude"]}
    compare("world", cells, EvalConfig(), "runs/demo")

``aptp compare`` and ``aptp ablate`` (a grid of overrides) are the command-line faces of this module.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from aptp.core.build import build
from aptp.core.config import load_experiment
from aptp.core.interfaces import BackboneModules
from aptp.pipeline import RoutedPipeline, prompt_noise

DONE_FILE = "summary.json"


@dataclass
class EvalConfig:
    """The shared evaluation every model of a comparison gets (the paired protocol).

    Every model generates the same held-out prompts from the same initial noise: prompt ``i`` under
    sampling seed ``s`` starts from noise seeded by ``(s, i)`` alone, whatever batch it runs in, and
    a deterministic sampler (DDIM, eta 0) turns it into an image. Per-prompt scores are averaged
    over the sampling seeds and compared with the reference model's on the same prompts (paired
    bootstrap over prompts, stratified by kind; see :mod:`aptp.stats`).
    """

    num_prompts: int = 64  # prompts read from ``prompts_file`` (world prompts: see prompts_per_kind)
    prompts_per_kind: int = 64  # world prompts, stratified: this many of each kind of the world's mix
    prompts_file: Optional[str] = None  # a prompt file (one per line / TSV with Prompt); None: the world's
    seed: int = 12345  # the held-out world prompts
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # initial-noise seeds, each prompt
    sampler: str = "ddim"  # "ddim": deterministic DDIM (eta 0) on the backbone's schedule; "backbone": as loaded
    steps: int = 25  # denoising steps
    guidance_scale: float = 1.0
    batch_size: int = 16  # most prompts one expert batch holds
    metrics: list[str] = field(default_factory=lambda: ["world_accuracy", "world_fd", "world_mmd"])
    reference: str = "dense"  # the model every other one is compared with (paired differences)
    pairs: list[str] = field(default_factory=list)  # further comparisons "a:b" (a against b)
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    confidence: float = 0.95
    budget: Optional[float] = None  # the kept-MACs budget the pruned models should meet (deployed, +-0.01)
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    latency_rounds: int = 10  # interleaved rounds over every model (see aptp.timing)
    latency_repeats: int = 2  # calls per model and round
    latency_threads: int = 1  # torch threads while timing on CPU
    grid_per_expert: int = 8  # images per expert in the report's grids
    note: Optional[str] = None  # a sentence the report shows under its title (e.g. "reduced protocol")

    def __post_init__(self) -> None:
        if min(self.num_prompts, self.prompts_per_kind, self.steps, self.batch_size, self.latency_rounds,
               self.latency_repeats, self.latency_threads) < 1:
            raise ValueError("num_prompts, prompts_per_kind, steps, batch_size and the latency_* counts must be >= 1.")
        if not self.sample_seeds or len(set(self.sample_seeds)) != len(self.sample_seeds):
            raise ValueError(f"sample_seeds={self.sample_seeds!r}: give at least one seed, each once.")
        if self.sampler not in ("ddim", "backbone"):
            raise ValueError(f"sampler={self.sampler!r}: use 'ddim' (deterministic) or 'backbone'.")
        if self.bootstrap < 1000 or not 0.5 < self.confidence < 1.0:
            raise ValueError(f"bootstrap={self.bootstrap} must be >= 1000 and confidence={self.confidence} in (0.5, 1).")
        for pair in self.pairs:
            if pair.count(":") != 1 or "" in pair.split(":"):
                raise ValueError(f"pairs entry {pair!r} must look like 'model_a:model_b'.")


@dataclass
class EvalPrompts:
    prompts: list[str]
    reference: torch.Tensor | None  # (N, 3, H, W) in [0, 1]: the world's ground-truth renders
    difficulty: list[int] | None
    kinds: list[str] | None = None  # each prompt's kind (the stratum of the bootstrap)


def eval_prompts(cfg: EvalConfig, resolution: int) -> EvalPrompts:
    """The held-out prompts: from ``prompts_file``, or ``prompts_per_kind`` of each kind of the
    world's mix with their renders (kind ``j`` drawn from world seed ``seed + 1000 j``)."""
    if cfg.prompts_file:
        from aptp.data.prompts import read_prompts

        return EvalPrompts(read_prompts(cfg.prompts_file)[: cfg.num_prompts], None, None, None)
    import numpy as np

    from aptp.world.data import World, WorldConfig

    world = World(WorldConfig(image_size=resolution))
    kinds = [k for k, _ in world.config.kind_weights()]
    samples = [world.sample_one(cfg.seed + 1000 * j, i, kind) for j, kind in enumerate(kinds)
               for i in range(cfg.prompts_per_kind)]
    ref = torch.stack([torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                       for s in samples])
    return EvalPrompts([s.caption for s in samples], ref, [s.difficulty for s in samples],
                       [s.scene.kind for s in samples])


def noise_seed(sample_seed: int, index: int) -> int:
    """The seed of prompt ``index``'s initial noise under ``sample_seed`` (the same in every model)."""
    return int(sample_seed) * 1_000_003 + int(index)


def dense_pipeline(run_dir: str | Path) -> RoutedPipeline:
    """The dense model of a run as a one-expert pipeline (same backbone, encoder, sampling code)."""
    from aptp.routers.single import SingleRouter

    pipe = RoutedPipeline.from_run(run_dir)
    return RoutedPipeline(pipe.backbone, pipe.modules, pipe.encoder, SingleRouter(), {0: pipe.modules.denoiser})


def deterministic_modules(modules: BackboneModules, sampler: str) -> BackboneModules:
    """``modules`` with a DDIM scheduler (eta 0: no noise after the initial one) on the same schedule.
    A flow-matching backbone (SD3, FLUX) keeps its Euler flow sampler, which is deterministic already
    (DDIM's noise schedule does not apply to it)."""
    if sampler == "backbone" or "FlowMatch" in type(modules.scheduler).__name__:
        return modules
    from diffusers import DDIMScheduler

    return replace(modules, scheduler=DDIMScheduler.from_config(modules.scheduler.config))


def evaluate_pipeline(name: str, pipe: RoutedPipeline, prompts: EvalPrompts, cfg: EvalConfig,
                      metrics: Mapping[str, Any], kept_ratios: torch.Tensor | None,
                      train_seed: int | None = None) -> dict[str, Any]:
    """Generate the evaluation prompts under every sampling seed, score them per prompt and as a set.

    Returns ``row`` (set-level figures), ``per_prompt`` (one dict per prompt and sampling seed),
    ``images`` / ``expert_ids`` of the first sampling seed (for grids)."""
    import numpy as np

    from aptp.metrics.suite import evaluate

    for k in range(pipe.router.num_experts):  # load every expert before generating
        pipe.expert(k)
    shape = (len(prompts.prompts), *pipe.backbone.conditioning().sample_shape)
    images_per_seed, start = [], time.perf_counter()
    for s in cfg.sample_seeds:
        latents = prompt_noise(shape, [noise_seed(s, i) for i in range(len(prompts.prompts))])
        out = pipe(prompts.prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                   latents=latents, output_type="pt")
        images_per_seed.append(out.images)
    seconds = time.perf_counter() - start
    ids = out.expert_ids  # routing does not depend on the noise
    n_images = len(prompts.prompts) * len(cfg.sample_seeds)
    row: dict[str, Any] = {"model": name, "train_seed": train_seed, "num_experts": pipe.router.num_experts,
                           "seconds_per_image": seconds / n_images}
    row["load"] = torch.bincount(ids, minlength=pipe.router.num_experts).tolist()
    kept = kept_ratios[ids] if kept_ratios is not None else torch.ones(len(ids))  # (N,)
    if kept_ratios is not None:
        row["expert_macs_ratios"] = [round(float(r), 4) for r in kept_ratios]
    row["mean_macs_ratio"] = float(kept.mean())  # deployed: inference routing on the evaluation prompts
    per_prompt, per_image = [], {}  # per_image: metric -> values of every image, seed by seed
    for s, images in zip(cfg.sample_seeds, images_per_seed):
        values = {m: metric.per_sample(images, prompts.prompts) for m, metric in metrics.items()}
        for m, v in values.items():
            if v is not None:
                per_image.setdefault(m, []).extend(v)
        for i, prompt in enumerate(prompts.prompts):
            rec = {"model": name, "prompt": prompt, "prompt_index": i,
                   "kind": prompts.kinds[i] if prompts.kinds else None,
                   "difficulty": prompts.difficulty[i] if prompts.difficulty else None,
                   "sample_seed": int(s), "train_seed": train_seed, "expert": int(ids[i]),
                   "kept_macs": round(float(kept[i]), 6)}
            rec.update({m: v[i] for m, v in values.items() if v is not None})
            per_prompt.append(rec)
    # a per-sample metric's set value is the mean of its per-image values (its contract): no second pass
    row.update({m: float(np.nanmean(v)) for m, v in per_image.items()})
    set_level = {m: metric for m, metric in metrics.items() if m not in per_image}
    if set_level:  # set-level values over the images of every sampling seed
        pooled = torch.cat(images_per_seed)
        row.update(evaluate(pooled, prompts.prompts * len(cfg.sample_seeds), set_level, reference=prompts.reference))
    if prompts.difficulty is not None and kept_ratios is not None and len(set(kept_ratios.tolist())) > 1:
        from scipy.stats import spearmanr

        rho = spearmanr(prompts.difficulty, kept.tolist())
        row["difficulty_vs_macs_spearman"] = float(rho.statistic)
        row["difficulty_vs_macs_p"] = float(rho.pvalue)
    return {"row": row, "per_prompt": per_prompt, "images": images_per_seed[0], "expert_ids": ids, "pipe": pipe}


def measure_latency(results: Mapping[str, dict[str, Any]], prompts: EvalPrompts, cfg: EvalConfig) -> None:
    """Time every model's experts and its routed serving of a mixed batch, all interleaved
    (:func:`aptp.timing.time_interleaved`); writes ``step_ms_b{B}`` (median per expert),
    ``routed_ms_b{B}`` (median / quartiles of one denoising step of the routed groups of ``B``
    evaluation prompts) and ``latency_vs_reference_b{B}`` into each row."""
    from aptp.timing import time_interleaved

    any_pipe = next(iter(results.values()))["pipe"]
    backbone, modules = any_pipe.backbone, any_pipe.modules
    param = next(modules.denoiser.parameters())
    mixed = torch.randperm(len(prompts.prompts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    candidates = {}
    for b in cfg.latency_batch_sizes:
        x = torch.randn(b, *backbone.conditioning().sample_shape, generator=torch.Generator().manual_seed(b))
        x = x.to(param.device, param.dtype)
        t = torch.full((b,), 500, device=param.device)
        chosen = [mixed[i % len(mixed)] for i in range(b)]
        text = backbone.encode_prompts(modules, [prompts.prompts[i] for i in chosen]).to(param.device, param.dtype)
        for name, res in results.items():
            pipe, ids = res["pipe"], res["expert_ids"]
            for k in range(pipe.router.num_experts):
                candidates[f"{name}|expert{k}|{b}"] = functools.partial(backbone.denoise, pipe.expert(k), x, t, text)
            routed = ids[chosen]  # (b,) the expert of each prompt of the mixed batch
            groups = [(pipe.expert(k), (routed == k).nonzero().flatten()) for k in routed.unique().tolist()]
            candidates[f"{name}|routed|{b}"] = functools.partial(_routed_step, backbone, groups, x, t, text)
    timings = time_interleaved(candidates, rounds=cfg.latency_rounds, repeats=cfg.latency_repeats,
                               device=param.device, threads=cfg.latency_threads)
    for name, res in results.items():
        row = res["row"]
        for b in cfg.latency_batch_sizes:
            row[f"step_ms_b{b}"] = [timings[f"{name}|expert{k}|{b}"].median for k in range(row["num_experts"])]
            row[f"routed_ms_b{b}"] = timings[f"{name}|routed|{b}"].as_dict()
    # the reference model's row (its first training seed when it has several; results keys carry the seed)
    ref = next(res["row"] for res in results.values() if res["row"]["model"] == cfg.reference)
    for res in results.values():
        for b in cfg.latency_batch_sizes:
            res["row"][f"latency_vs_reference_b{b}"] = (
                res["row"][f"routed_ms_b{b}"]["median_ms"] / ref[f"routed_ms_b{b}"]["median_ms"])


def _routed_step(backbone, groups, x, t, text) -> None:
    """One denoising step of a mixed batch: each expert's group as one call."""
    for denoiser, idx in groups:
        backbone.denoise(denoiser, x[idx], t[idx], text[idx])


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
            progress: bool = True, seeds: Sequence[int] = (),
            grid: Mapping[str, Any] | None = None, reuse_evaluations: bool = False) -> dict[str, Any]:
    """Run every cell (once per training seed in ``seeds``; none: the experiment's own seed),
    evaluate dense + every cell with the paired protocol, time them interleaved, and write
    ``results.json``, ``per_prompt.jsonl`` and ``report.md``. With ``grid`` (:func:`grid_spec`) the
    cells it names form an ablation grid and the others are its baselines: ``ablation.md`` and its
    figures are written too (:mod:`aptp.ablation`).

    With ``reuse_evaluations`` a cell's previous evaluation in ``out_dir`` (its row and per-prompt
    rows) is reused instead of generated again when the previous ``results.json`` has the same eval
    config (latency and reporting settings aside), the cell's summary and fingerprint file are the
    same as then (not retrained), and dense, always evaluated again, reproduces its previous
    per-prompt rows exactly; otherwise every
    cell is evaluated. Latency is always measured again, for every model (see :func:`_reusable`)."""
    from aptp.core.rundir import code_revision
    from aptp.metrics.suite import build_metrics
    from aptp.reporting import write_report

    from aptp.core.config import check_name

    for cell in cells:  # a cell name becomes a folder under out_dir/cells: it may not escape it
        check_name(cell, "comparison cell name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "dense" in cells:
        raise ValueError("a cell may not be named 'dense': that name is the unpruned reference model.")
    unknown = [m for m in [cfg.reference, *(x for p in cfg.pairs for x in p.split(":"))] if m != "dense" and m not in cells]
    if unknown:
        from aptp.core.errors import ConfigError

        raise ConfigError(f"eval.reference / eval.pairs name {sorted(set(unknown))}, which are not cells of this "
                         f"comparison; use 'dense' or one of {list(cells)}.")
    previous = _previous_evaluation(out_dir) if reuse_evaluations else None  # before this call overwrites it
    runs: dict[tuple[str, int | None], Path] = {}
    summaries: dict[str, Any] = {}
    jobs = [(name, s) for name in cells for s in (list(seeds) or [None])]
    for name, s in tqdm(jobs, desc="compositions", disable=not progress):
        folder = out_dir / "cells" / (name if s is None else f"{name}-seed{s}")
        overrides = list(cells[name]) + ([f"seed={s}"] if s is not None else [])
        summaries[folder.name] = run_cell(base, overrides, folder)
        runs[(name, s)] = folder
    first = next(iter(runs.values()))
    dense = dense_pipeline(first)
    modules = deterministic_modules(dense.modules, cfg.sampler)
    dense = RoutedPipeline(dense.backbone, modules, dense.encoder, dense.router, {0: modules.denoiser})
    prompts = eval_prompts(cfg, _pixel_resolution(dense, dense.backbone.conditioning()))
    metrics = build_metrics(cfg.metrics)
    results = {"dense": evaluate_pipeline("dense", dense, prompts, cfg, metrics, None)}
    if previous is not None and not _reusable(previous, cfg, results["dense"]["per_prompt"]):
        previous = None
    reused_from: dict[str, Any] = {}
    fingerprints = {run.name: _fingerprint_digest(run) for run in runs.values()}
    for (name, s), run in tqdm(list(runs.items()), desc="evaluation", disable=not progress):
        same_backbone = _backbone_section(run) == _backbone_section(first)
        pipe = RoutedPipeline.from_run(run, modules=modules if same_backbone else None)
        if not same_backbone:
            pipe.modules = deterministic_modules(pipe.modules, cfg.sampler)
        key = name if s is None else f"{name}-seed{s}"
        old = (_previous_cell(previous, key, name, s, summaries[run.name], fingerprints[run.name], prompts, cfg)
               if previous else None)
        if old is not None:
            results[key] = {**old, "pipe": pipe}
            # where a reused evaluation was reused before, it dates from that earlier revision
            reused_from[key] = (previous.get("reused_from") or {}).get(key, previous.get("code_revision"))
        else:
            results[key] = evaluate_pipeline(name, pipe, prompts, cfg, metrics, pipe.kept_ratios, train_seed=s)
    measure_latency(results, prompts, cfg)  # always measured again, every model interleaved
    per_prompt = [rec for res in results.values() for rec in res["per_prompt"]]
    with open(out_dir / "per_prompt.jsonl", "w") as f:
        for rec in per_prompt:
            f.write(json.dumps(rec) + "\n")
    stats = paired_summary(per_prompt, [r["row"] for r in results.values()], cfg, metrics)
    rows = [r["row"] for r in results.values()]
    (out_dir / "results.json").write_text(json.dumps({"eval": asdict(cfg), "seeds": list(seeds), "rows": rows,
                                                      "intervals": stats, "summaries": summaries,
                                                      "grid": dict(grid or {}), "code_revision": code_revision(),
                                                      "cell_fingerprints": fingerprints,
                                                      "reused": list(reused_from), "reused_from": reused_from},
                                                     indent=1, default=str) + "\n")
    report = write_report(out_dir, results, prompts, cfg, summaries, stats,
                          cell_dirs={folder.name: folder for folder in runs.values()}, reused=reused_from)
    out = {"rows": rows, "intervals": stats, "report": str(report)}
    if grid:
        from aptp.ablation import write_ablation

        out["ablation"] = str(write_ablation(out_dir))
    return out


LATENCY_EVAL_FIELDS = ("latency_batch_sizes", "latency_rounds", "latency_repeats", "latency_threads")
#: eval settings that change only how results are reported, never an image or a per-prompt score
REPORT_EVAL_FIELDS = ("reference", "pairs", "bootstrap", "confidence", "budget", "grid_per_expert", "note")
LATENCY_ROW_PREFIXES = ("step_ms_b", "routed_ms_b", "latency_vs_reference_b")


def _json_normal(value: Any) -> str:
    """``value`` as canonical JSON text (after the round trip results.json makes): equal texts, equal
    values (NaN included, which ``==`` would call unequal)."""
    return json.dumps(json.loads(json.dumps(value, default=str)), sort_keys=True)


def _previous_evaluation(out_dir: Path) -> dict[str, Any] | None:
    """The previous ``results.json`` of ``out_dir`` with its per-prompt rows (``"per_prompt"``), or
    None where there is none (or it cannot be read)."""
    try:
        previous = json.loads((out_dir / "results.json").read_text())
        previous["per_prompt"] = [json.loads(line) for line in
                                  (out_dir / "per_prompt.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and isinstance(previous.get("rows"), list) else None


def _reusable(previous: Mapping[str, Any], cfg: EvalConfig, dense_rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the previous evaluation may be reused at all: the same eval config except for the
    latency and reporting settings (REPORT_EVAL_FIELDS: pairs, intervals, budget flag, ...), and dense
    (evaluated again) reproducing its previous per-prompt rows exactly."""
    def protocol(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in eval_cfg.items() if k not in LATENCY_EVAL_FIELDS + REPORT_EVAL_FIELDS}

    before, now = protocol(previous.get("eval") or {}), protocol(asdict(cfg))
    if _json_normal(before) != _json_normal(now):
        changed = sorted(k for k in before.keys() | now.keys()
                         if _json_normal(before.get(k)) != _json_normal(now.get(k)))
        warnings.warn(f"the previous evaluation used another eval config ({', '.join(changed)}): "
                      "re-evaluating every cell", stacklevel=3)
        return False
    old_dense = [r for r in previous["per_prompt"] if r.get("model") == "dense"]
    if _json_normal(old_dense) != _json_normal(list(dense_rows)):
        warnings.warn("dense no longer reproduces its previous evaluation (evaluation code or environment "
                      "changed): re-evaluating every cell", stacklevel=3)
        return False
    return True


def _fingerprint_digest(run: Path) -> str | None:
    """sha256 of a cell folder's fingerprint file (its config and code revision as trained), or None."""
    import hashlib

    from aptp.core.rundir import FINGERPRINT_FILE

    path = run / FINGERPRINT_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _previous_cell(previous: Mapping[str, Any], key: str, name: str, train_seed: int | None,
                   summary: Any, fingerprint: str | None, prompts: EvalPrompts,
                   cfg: EvalConfig) -> dict[str, Any] | None:
    """Cell ``key``'s previous evaluation (``row`` without latency, ``per_prompt``, ``expert_ids``
    of the first sampling seed, ``images`` None) where its summary is the same as then (it was not
    trained again), so is its fingerprint file (not retrained from another config whose summary
    happens to match; results written before fingerprints were recorded are checked by summary only)
    and its previous rows cover every prompt and sampling seed; else None."""
    if _json_normal(summary) != _json_normal((previous.get("summaries") or {}).get(key)):
        return None
    recorded = previous.get("cell_fingerprints")
    if recorded is not None and recorded.get(key) != fingerprint:
        return None
    rows = [r for r in previous["rows"] if r.get("model") == name and r.get("train_seed") == train_seed]
    per_prompt = [r for r in previous["per_prompt"] if r.get("model") == name and r.get("train_seed") == train_seed]
    expected = {(int(s), i, p) for s in cfg.sample_seeds for i, p in enumerate(prompts.prompts)}
    found = [(r.get("sample_seed"), r.get("prompt_index"), r.get("prompt")) for r in per_prompt]
    if len(rows) != 1 or len(found) != len(expected) or set(found) != expected:
        return None
    row = {k: v for k, v in rows[0].items() if not k.startswith(LATENCY_ROW_PREFIXES)}
    first_seed = sorted((r for r in per_prompt if r["sample_seed"] == int(cfg.sample_seeds[0])),
                        key=lambda r: r["prompt_index"])
    ids = torch.tensor([int(r["expert"]) for r in first_seed], dtype=torch.long)
    return {"row": row, "per_prompt": per_prompt, "images": None, "expert_ids": ids}


def paired_summary(per_prompt: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], cfg: EvalConfig,
                   metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per model and per-prompt metric: the mean with its interval, overall and per kind; the
    paired difference against ``cfg.reference`` (and each of ``cfg.pairs``) with its interval and
    verdict; the spread over training seeds. Per-prompt values are averaged over sampling seeds
    (and training seeds) first: the prompt is the resampling unit."""
    import numpy as np

    from aptp.stats import Interval, bootstrap_mean, spread, verdict

    models = list(dict.fromkeys(r["model"] for r in per_prompt))
    per_sample = [m for m in metrics if m in per_prompt[0]]  # metrics with a value per image
    n_prompts = max(r["prompt_index"] for r in per_prompt) + 1
    kinds = [None] * n_prompts
    for r in per_prompt:
        kinds[r["prompt_index"]] = r.get("kind")
    strata = kinds if all(k is not None for k in kinds) else None
    boot = {"n_boot": cfg.bootstrap, "confidence": cfg.confidence}

    def table(model: str, metric: str, train_seed: Any = "all") -> np.ndarray:
        """(N,) mean over sampling (and training) seeds per prompt, NaN where never stated."""
        acc, cnt = np.zeros(n_prompts), np.zeros(n_prompts)
        for r in per_prompt:
            if r["model"] == model and (train_seed == "all" or r["train_seed"] == train_seed):
                v = r.get(metric)
                if v is not None and not (isinstance(v, float) and np.isnan(v)):
                    acc[r["prompt_index"]] += v
                    cnt[r["prompt_index"]] += 1
        with np.errstate(invalid="ignore"):
            return acc / cnt

    def intervals(values: np.ndarray, other: np.ndarray | None = None) -> dict[str, Any]:
        """Mean of ``values`` (or of ``values - other``, paired) with intervals: overall, per kind."""
        ok = ~np.isnan(values) if other is None else ~(np.isnan(values) | np.isnan(other))
        if not ok.any():
            return {}
        x = values[ok] if other is None else values[ok] - other[ok]  # (n,)
        st = [strata[i] for i in np.flatnonzero(ok)] if strata else None
        out = {"all": bootstrap_mean(x, strata=st, **boot).as_dict()}
        for kind in sorted(set(st or [])):
            out[kind] = bootstrap_mean(x[np.asarray([s == kind for s in st])], **boot).as_dict()
        return out

    pairs = [(m, cfg.reference) for m in models if m != cfg.reference and cfg.reference in models]
    pairs += [tuple(p.split(":")) for p in cfg.pairs if all(x in models for x in p.split(":"))]
    out: dict[str, Any] = {"reference": cfg.reference, "n_prompts": n_prompts, "sample_seeds": list(cfg.sample_seeds),
                           "confidence": cfg.confidence, "bootstrap": cfg.bootstrap, "models": {}, "pairs": []}
    for metric in per_sample:
        higher = bool(getattr(metrics[metric], "higher_is_better", True))
        for model in models:
            entry = out["models"].setdefault(model, {})
            entry[metric] = intervals(table(model, metric))
            seeds = sorted({r["train_seed"] for r in per_prompt if r["model"] == model and r["train_seed"] is not None})
            if len(seeds) > 1:
                entry[f"{metric}_train_seed_spread"] = spread([float(np.nanmean(table(model, metric, s))) for s in seeds])
        for a, b in pairs:
            diff = intervals(table(a, metric), table(b, metric))
            if not diff:
                continue
            verdicts = {k: verdict(Interval(**v), higher) for k, v in diff.items()}
            out["pairs"].append({"a": a, "b": b, "metric": metric, "difference": diff, "verdict": verdicts})
    macs = {}
    for r in rows:
        macs.setdefault(r["model"], []).append(r["mean_macs_ratio"])
    out["deployed_macs"] = {m: float(np.mean(v)) for m, v in macs.items()}
    if cfg.budget is not None:
        out["budget"] = cfg.budget
        out["budget_mismatch"] = {m: round(v - cfg.budget, 4) for m, v in out["deployed_macs"].items()
                                  if m != "dense" and abs(v - cfg.budget) > 0.01}
    return out


def _backbone_section(run_dir: Path) -> Any:
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").backbone)


def _pixel_resolution(pipe: RoutedPipeline, cond) -> int:
    vae = pipe.modules.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return cond.sample_shape[1] * factor


def expand_grid(axes: Mapping[str, Sequence[Any]], shared: Mapping[str, Sequence[str]] | None = None
                ) -> dict[str, dict[str, str]]:
    """One cell per combination of the ``axes`` (override key -> values, in order), as cell name ->
    ``{key: value}`` (its overrides are ``key=value`` in axis order).

    ``shared`` names, for a ``key=value``, the axes that do not matter in cells having it: those
    cells take the axis' first value, leave it out of their name and are run once. E.g.
    ``{"router.num_experts=1": ["router"]}``: one K = 1 cell per granularity, not one per router.

    >>> list(expand_grid({"router": ["ot", "kmeans"], "router.num_experts": [1, 4]},
    ...                  {"router.num_experts=1": ["router"]}))
    ['router.num_experts=1', 'router=ot,router.num_experts=4', 'router=kmeans,router.num_experts=4']
    """
    from aptp.core.errors import ConfigError

    keys = list(axes)
    values = {k: [str(v) for v in axes[k]] for k in keys}
    for key, vals in values.items():
        if not vals or len(set(vals)) != len(vals) or any(v == "" or "," in v for v in vals):
            raise ConfigError(f"grid axis {key!r}: give at least one value, each once, without commas (got {vals}).")
    for cond, dropped in (shared or {}).items():
        key = cond.split("=", 1)[0]
        if "=" not in cond or key not in values or any(d not in values for d in dropped):
            raise ConfigError(f"grid_shared entry {cond!r}: {list(dropped)}: it must be 'axis=value: [other axes]' "
                              f"with axes from {keys}.")
    cells: dict[str, dict[str, str]] = {}
    for combo in itertools.product(*(values[k] for k in keys)):
        cell = dict(zip(keys, combo))
        hidden: set[str] = set()
        for cond, dropped in (shared or {}).items():
            key, value = cond.split("=", 1)
            if cell[key] == value:
                hidden.update(dropped)
        for key in hidden:
            cell[key] = values[key][0]
        name = ",".join(f"{k}={v}" for k, v in cell.items() if k not in hidden)
        cells.setdefault(name, cell)
    return cells


def grid_spec(axes: Mapping[str, Sequence[Any]], shared: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """What :func:`compare` and :mod:`aptp.ablation` need to know of a grid: its ``axes`` (key ->
    values, in order), its ``shared`` rules and its ``cells`` (name -> axis values)."""
    return {"axes": {k: [str(v) for v in vals] for k, vals in axes.items()},
            "shared": {k: list(v) for k, v in (shared or {}).items()}, "cells": expand_grid(axes, shared)}


def parse_grid(grid: Sequence[str]) -> dict[str, list[str]]:
    """``["router=ot,kmeans", "router.num_experts=1,4"]`` -> ``{"router": ["ot", "kmeans"], ...}``."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        if "=" not in item:
            raise ValueError(f"grid axis {item!r} must look like key=v1,v2 (e.g. router=ot,kmeans).")
        key, vals = item.split("=", 1)
        axes[key] = [v for v in vals.split(",") if v]
        if not axes[key]:
            raise ValueError(f"grid axis {item!r} has no values.")
    return axes


def grid_cells(grid: Sequence[str], shared: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """``["router=ot,kmeans", "router.num_experts=1,4"]`` -> one cell per combination, named
    ``router=ot,router.num_experts=1`` etc., with its overrides (see :func:`expand_grid`)."""
    return {name: [f"{k}={v}" for k, v in cell.items()] for name, cell in expand_grid(parse_grid(grid), shared).items()}


@dataclass
class ComparisonConfig:
    """A comparison file (``configs/comparison/<name>.yaml``): compositions side by side."""

    name: str = "comparison"
    base: str = "world"  # the experiment every cell starts from (name or YAML path)
    seeds: list[int] = field(default_factory=list)  # training seeds: each cell runs once per seed
    output_dir: str = "runs/${name}"
    cells: dict[str, list[str]] = field(default_factory=dict)  # cell name -> overrides of the base
    # an ablation grid (override key -> values): one more cell per combination, named key=value,...
    # (run before ``cells``, which then hold the baselines); the report gets an ablation section
    grid: dict[str, list[str]] = field(default_factory=dict)
    grid_shared: dict[str, list[str]] = field(default_factory=dict)  # "key=value" -> axes that do not matter then
    grid_set: list[str] = field(default_factory=list)  # overrides every grid cell gets first (e.g. its budget)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def grid_spec(self) -> dict[str, Any]:
        """The grid's axes, shared rules and cells (:func:`grid_spec`); empty without a grid."""
        return grid_spec(self.grid, self.grid_shared) if self.grid else {}


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
    grid = {name: list(result.grid_set) + [f"{k}={v}" for k, v in cell.items()]
            for name, cell in result.grid_spec().get("cells", {}).items()}
    clash = sorted(set(grid) & set(result.cells))
    if clash:
        raise ConfigError(f"{path}: cells {clash} have the names of grid cells; rename them.")
    result.cells = {**grid, **result.cells}
    if not result.cells:
        raise ConfigError(f"{path}: 'cells' and 'grid' are empty; name at least one composition (cell name: [overrides]).")
    for cell, extra in cell_extra.items():
        result.cells[cell] = list(result.cells[cell]) + extra
    return result
