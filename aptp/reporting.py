"""The comparison report: ``report.md`` with a quality/latency table and PNG figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, cols: int = 8, scale: int = 2) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, ``cols`` per row, upscaled ``scale`` times."""
    n, _, h, w = images.shape
    rows = max(1, -(-n // cols))
    canvas = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = images[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return str(x)


def _latency(row: dict[str, Any], key: str) -> float | None:
    """Load-weighted mean step latency over experts."""
    lat, load = row.get(key), row.get("load")
    if not lat:
        return None
    w = np.asarray(load, dtype=float) if load and sum(load) else np.ones(len(lat))
    return float(np.average(lat, weights=w))


def _ci(entry: Mapping[str, Any] | None) -> str:
    """'0.812 [0.770, 0.851]' from an interval dict (see aptp.stats.Interval)."""
    if not entry:
        return "–"
    return f"{entry['estimate']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _protocol(prompts, cfg) -> list[str]:
    kinds = sorted(set(prompts.kinds)) if prompts.kinds else []
    per_kind = (", ".join(f"{k} {prompts.kinds.count(k)}" for k in kinds)) if kinds else "not stratified"
    return [f"**Protocol.** {len(prompts.prompts)} held-out prompts ({per_kind}; prompt seed {cfg.seed}), each generated "
            f"with {len(cfg.sample_seeds)} sampling seeds {list(cfg.sample_seeds)} from the same initial noise in every "
            f"model, {cfg.steps} {'DDIM (deterministic)' if cfg.sampler == 'ddim' else 'backbone-scheduler'} steps, "
            f"guidance {cfg.guidance_scale}. Per-prompt scores are averaged over the sampling seeds; intervals are "
            f"{cfg.confidence:.0%} percentile-bootstrap intervals over prompts ({cfg.bootstrap} resamples, stratified by "
            "kind); a difference is called better or worse only when its paired interval excludes zero. Latency: "
            f"{cfg.latency_rounds} interleaved rounds x {cfg.latency_repeats} calls of every model, "
            f"{cfg.latency_threads} torch thread(s), thread CPU time on CPU (CUDA events on a GPU); 'routed' times "
            "one denoising step of the real routed groups of a mixed batch of evaluation prompts. Per-prompt rows: "
            "`per_prompt.jsonl`.", ""]


def write_report(out_dir: Path, results: Mapping[str, dict[str, Any]], prompts, cfg,
                 summaries: Mapping[str, Any], stats: Mapping[str, Any],
                 cell_dirs: Mapping[str, Path] | None = None, reused: Mapping[str, Any] | None = None) -> Path:
    """``report.md`` and its figures. ``reused``: results key -> the code revision (or None) of the
    previous evaluation reused for it (see ``compare(reuse_evaluations=True)``); such a model has
    ``images`` None and gets no image grids."""
    plt = _plt()
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = [r["row"] for r in results.values()]
    metric_keys = [m for m in cfg.metrics if any(m in r for r in rows)]
    set_metrics = [m for m in metric_keys if not any(m in e for e in stats["models"].values())]
    interval_metrics = [m for m in metric_keys if m not in set_metrics]
    lat_keys = [f"step_ms_b{b}" for b in cfg.latency_batch_sizes]
    big = cfg.latency_batch_sizes[-1]
    ref = stats["reference"]

    lines = [f"# Comparison: {', '.join(dict.fromkeys(r['model'] for r in rows))}", ""]
    lines += ([f"_{cfg.note}_", ""] if cfg.note else []) + _protocol(prompts, cfg)
    if reused:
        lines += ["**Reused evaluations.** " + "; ".join(
            f"{key} (evaluated at {_revision(rev)})" for key, rev in reused.items())
            + ": their quality figures and per-prompt rows come from the previous results.json of this folder "
            "(same eval config, same cell summary, dense reproduced exactly); latency was measured again.", ""]
    verdict_of = {(p["a"], p["b"], p["metric"]): p for p in stats["pairs"]}
    header = ["model", "train seeds", "experts", "deployed mean kept MACs"]
    for m in interval_metrics:
        header += [f"{m} [95% CI]", f"Δ vs {ref} [95% CI]", "verdict"]
    header += [*set_metrics, f"routed ms/step b{big} median [IQR]", f"vs {ref}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        seeds = [r["train_seed"] for r in mrows if r.get("train_seed") is not None]
        cells = [model, ",".join(map(str, seeds)) or "–", mrows[0]["num_experts"],
                 stats["deployed_macs"].get(model)]
        for m in interval_metrics:
            p = verdict_of.get((model, ref, m))
            cells += [_ci(stats["models"].get(model, {}).get(m, {}).get("all")),
                      _ci(p["difference"]["all"]) if p else "–", p["verdict"]["all"] if p else "–"]
        cells += [float(np.mean([r[m] for r in mrows])) for m in set_metrics]
        lat = [r[f"routed_ms_b{big}"] for r in mrows if f"routed_ms_b{big}" in r]
        cells += [f"{np.mean([l['median_ms'] for l in lat]):.2f} [{np.mean([l['p25_ms'] for l in lat]):.2f}–"
                  f"{np.mean([l['p75_ms'] for l in lat]):.2f}]" if lat else "–",
                  np.mean([r[f"latency_vs_reference_b{big}"] for r in mrows]) if lat else None]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines.append("")
    if stats.get("budget") is not None:
        mism = stats.get("budget_mismatch") or {}
        lines += [f"Budget {stats['budget']:.2f} of the dense MACs (deployed, +-0.01): "
                  + ("every pruned model meets it." if not mism else
                     "**mismatch** " + ", ".join(f"{m} {d:+.3f}" for m, d in mism.items())
                     + " (compare these models with that in mind)."), ""]
    if set_metrics:
        lines += [f"{', '.join(set_metrics)}: set-level values over all images of all sampling seeds (no interval: "
                  "a set-level metric has no per-prompt value to pair).", ""]
    for m in interval_metrics:
        kinds = [k for k in next(iter(stats["models"].values())).get(m, {}) if k != "all"]
        if kinds:
            lines += [f"### {m} per kind (mean [95% CI]; Δ vs {ref} [95% CI], verdict)", "",
                      "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            for model, entry in stats["models"].items():
                p = verdict_of.get((model, ref, m))
                cells = []
                for k in kinds:
                    text = _ci(entry.get(m, {}).get(k))
                    if p and k in p["difference"]:
                        text += f"; Δ {_ci(p['difference'][k])} {p['verdict'][k]}"
                    cells.append(text)
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
        extra = [p for p in stats["pairs"] if p["b"] != ref and p["metric"] == m]
        if extra:
            lines += [f"### Pairs on {m}", "", "| a | b | Δ (a − b) [95% CI] | verdict for a |", "|---|---|---|---|"]
            lines += [f"| {p['a']} | {p['b']} | {_ci(p['difference']['all'])} | {p['verdict']['all']} |" for p in extra]
            lines.append("")
        spreads = {model: e[f"{m}_train_seed_spread"] for model, e in stats["models"].items()
                   if f"{m}_train_seed_spread" in e}
        if spreads:
            lines += [f"Spread of {m} over training seeds: " + "; ".join(
                f"{model} {v['min']:.3f}–{v['max']:.3f} (sd {v['std']:.3f}, {v['n']} seeds)"
                for model, v in spreads.items()), ""]
    if len(set(r["model"] for r in rows)) >= 3:
        lines += _tradeoff_figures(plt, fig_dir, rows, metric_keys, lat_keys)

    routed = [name for name, r in results.items() if r["row"]["num_experts"] > 1 or name != "dense"]
    for name in routed:
        res = results[name]
        row, ids, images = res["row"], res["expert_ids"], res["images"]
        lines += [f"## {name}", ""]
        if row.get("expert_macs_ratios"):
            fig, ax = plt.subplots(figsize=(max(3, 0.6 * len(row["expert_macs_ratios"]) + 1.5), 2.6))
            ax.bar(range(len(row["expert_macs_ratios"])), row["expert_macs_ratios"], color="tab:blue")
            for k, (m, n) in enumerate(zip(row["expert_macs_ratios"], row["load"])):
                ax.text(k, m, f"{n}", ha="center", va="bottom", fontsize=8)
            ax.set_xlabel("expert (label: evaluation prompts routed to it)")
            ax.set_ylabel("kept MACs ratio")
            ax.set_ylim(0, 1.1)
            ax.set_title(f"{name}: kept MACs per expert")
            fig.tight_layout()
            fig.savefig(fig_dir / f"{name}_expert_macs.png", dpi=120)
            plt.close(fig)
            lines += [f"![kept MACs per expert](figures/{name}_expert_macs.png)", ""]
        if prompts.difficulty is not None and row.get("expert_macs_ratios"):
            ratios = torch.tensor(row["expert_macs_ratios"])[ids]
            diffs = sorted(set(prompts.difficulty))
            means = [float(ratios[[d == x for x in prompts.difficulty]].mean()) for d in diffs]
            counts = [sum(d == x for x in prompts.difficulty) for d in diffs]
            fig, ax = plt.subplots(figsize=(4, 2.6))
            ax.bar([str(d) for d in diffs], means, color="tab:orange")
            for i, c in enumerate(counts):
                ax.text(i, means[i], f"n={c}", ha="center", va="bottom", fontsize=8)
            ax.set_xlabel("caption difficulty (world ground truth)")
            ax.set_ylabel("mean kept MACs of the expert")
            ax.set_ylim(0, 1.1)
            fig.tight_layout()
            fig.savefig(fig_dir / f"{name}_difficulty.png", dpi=120)
            plt.close(fig)
            rho = row.get("difficulty_vs_macs_spearman")
            lines += [f"![difficulty vs expert size](figures/{name}_difficulty.png)", "",
                      "Spearman rank correlation between caption difficulty and the kept MACs of the assigned "
                      f"expert: {_fmt(rho)} (p = {_fmt(row.get('difficulty_vs_macs_p'))})." if rho is not None
                      else "All experts have the same size: no difficulty-to-size relation to measure.", ""]
        if prompts.kinds and row["num_experts"] > 1:
            kinds = sorted(set(prompts.kinds))
            lines += ["| kind | " + " | ".join(f"expert {k}" for k in range(row["num_experts"]))
                      + " | mean kept MACs |", "|---|" + "---|" * (row["num_experts"] + 1)]
            for kind in kinds:
                sel = torch.tensor([k == kind for k in prompts.kinds])
                counts = torch.bincount(ids[sel], minlength=row["num_experts"]).tolist()
                macs = (float(torch.tensor(row["expert_macs_ratios"])[ids[sel]].mean())
                        if row.get("expert_macs_ratios") else None)
                lines.append(f"| {kind} | " + " | ".join(map(str, counts)) + f" | {_fmt(macs)} |")
            lines += ["", "Evaluation prompts of each kind per expert (inference routing).", ""]
        if images is None:
            lines += ["_Images not regenerated: evaluation reused (no image grids)._", ""]
        for k in range(row["num_experts"] if images is not None else 0):
            idx = (ids == k).nonzero().flatten()[: cfg.grid_per_expert]
            if len(idx) == 0:
                continue
            image_grid(images[idx], cols=len(idx)).save(fig_dir / f"{name}_expert{k}.png")
            caps = "; ".join(prompts.prompts[i] for i in idx.tolist())
            lines += [f"**expert {k}** ({row['load'][k]} prompts"
                      + (f", kept MACs {row['expert_macs_ratios'][k]:.2f}" if row.get("expert_macs_ratios") else "")
                      + f"): ![expert {k}](figures/{name}_expert{k}.png)", "", f"<sub>{caps}</sub>", ""]
    lines += training_curves(cell_dirs or {}, fig_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _revision(code: Any) -> str:
    """'aptp 0.1.0 at commit 0123456789ab (with uncommitted changes)' from a code-revision dict."""
    if not isinstance(code, Mapping):
        return "an unrecorded code revision"
    text = f"aptp {code.get('aptp', '?')}"
    if code.get("commit"):
        text += f" at commit {str(code['commit'])[:12]}" + (" with uncommitted changes" if code.get("dirty") else "")
    return text


def _tradeoff_figures(plt, fig_dir: Path, rows, metric_keys, lat_keys) -> list[str]:
    """Quality and latency against mean kept MACs, one point per model."""
    out = []
    panels = [(m, m) for m in metric_keys] + [(lat_keys[-1], f"{lat_keys[-1]} (load-weighted, ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            y = _latency(r, key) if key in lat_keys else r.get(key)
            if y is None:
                continue
            ax.scatter(r.get("mean_macs_ratio", 1.0), y, s=25)
            ax.annotate(r["model"], (r.get("mean_macs_ratio", 1.0), y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("mean kept MACs")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(fig_dir / "tradeoffs.png", dpi=120)
    plt.close(fig)
    out += ["![quality and latency against kept MACs](figures/tradeoffs.png)", ""]
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a training log (a last line cut by a kill is skipped)."""
    import json

    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _quarters(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(mean of the first quarter, of the third, of the last) of a noisy curve."""
    v = np.asarray(values, dtype=float)
    if v.size < 8:
        return None
    q = np.array_split(v, 4)
    return float(q[0].mean()), float(q[2].mean()), float(q[3].mean())


def training_curves(cells: Mapping[str, Path], fig_dir: Path, flat_below: float = 0.10) -> list[str]:
    """A "Training curves" section: per cell a figure of phase 1's kept-MACs ratio per code (and
    the target) and of phase 2's distillation error per expert, and a table saying whether
    fine-tuning had flattened — the distillation error of the last quarter of each expert's steps
    against the third quarter's: a drop of more than ``flat_below`` means it was still falling
    (more steps would have helped)."""
    plt = _plt()
    table, figs = [], []
    for name, folder in cells.items():
        p1, p2 = _read_jsonl(folder / "phase1.jsonl"), _read_jsonl(folder / "phase2.jsonl")
        if not p1 and not p2:
            continue
        target = None
        try:
            from omegaconf import OmegaConf

            target = OmegaConf.load(folder / "config.yaml").pruner.get("target_ratio")
        except Exception:  # a folder without a readable config: the curves alone
            target = None
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.0), squeeze=False)
        ax1, ax2 = axes[0]
        reached = None
        if p1:
            steps = [r["step"] for r in p1]
            codes = np.asarray([r["code_ratios"] for r in p1], dtype=float)  # (T, K)
            for k in range(codes.shape[1]):
                ax1.plot(steps, codes[:, k], lw=1, label=f"code {k}" if codes.shape[1] <= 8 else None)
            ax1.plot(steps, [r["mean_ratio"] for r in p1], "k--", lw=1, label="batch mean")
            if target is not None:
                ax1.axhline(float(target), color="grey", lw=0.8)
                reached = next((r["step"] for r in p1 if abs(r["mean_ratio"] - float(target)) <= 0.01), None)
            ax1.set_xlabel("phase-1 step")
            ax1.set_ylabel("kept MACs")
            ax1.legend(fontsize=6)
        changes, firsts, lasts = [], [], []
        for k in sorted({r.get("expert", 0) for r in p2}):
            d = [r["distill"] for r in p2 if r.get("expert", 0) == k]
            if not d:
                continue
            w = max(1, len(d) // 20)
            smooth = np.convolve(d, np.ones(w) / w, mode="valid")
            ax2.plot(np.arange(len(smooth)) + w - 1, smooth, lw=1, label=f"expert {k}" if k < 8 else None)
            qs = _quarters(d)
            if qs:
                firsts.append(qs[0])
                lasts.append(qs[2])
                changes.append(qs[2] / qs[1] - 1.0 if qs[1] > 0 else 0.0)
        if p2:
            ax2.set_yscale("log")
            ax2.set_xlabel("fine-tuning step (per expert)")
            ax2.set_ylabel("distillation error (moving mean)")
            ax2.legend(fontsize=6)
        fig.suptitle(name, fontsize=8)
        fig.tight_layout()
        fname = f"curves_{_safe_file(name)}.png"
        fig.savefig(fig_dir / fname, dpi=100)
        plt.close(fig)
        figs.append(f"[{name}](figures/{fname})")
        change = float(np.mean(changes)) if changes else None
        state = "–" if change is None else ("still falling" if change < -flat_below else "flat")
        last = p1[-1] if p1 else {}
        table.append(f"| {name} | {len(p1) and p1[-1]['step'] + 1 or '–'} | {reached if reached is not None else '–'} | "
                     + (" / ".join(f"{x:.2f}" for x in last.get("code_ratios", [])) or "–")
                     + f" | {sum(1 for _ in p2) or '–'} | "
                     + (f"{np.mean(firsts):.4f} → {np.mean(lasts):.4f}" if firsts else "–")
                     + f" | {_fmt(change)} | {state} |")
    if not table:
        return []
    return ["## Training curves", "",
            "Phase 1: kept-MACs ratio of each code's architecture (first step within 0.01 of the target; last "
            "ratios). Phase 2: distillation error of each expert, mean of the first and of the last quarter of its "
            f"steps; *change* is the last quarter against the third (below −{flat_below:.0%}: still falling).", "",
            "| cell | phase-1 steps | target reached at | final code ratios | fine-tuning steps | distillation "
            "first → last quarter | last-quarter change | fine-tuning |",
            "|---|---|---|---|---|---|---|---|", *table, "", "Figures: " + ", ".join(figs), ""]


def _safe_file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
