"""The comparison report: ``report.md`` with a quality/latency table and PNG figures."""

from __future__ import annotations

from collections.abc import Mapping
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


def write_report(out_dir: Path, results: Mapping[str, dict[str, Any]], prompts, cfg,
                 summaries: Mapping[str, Any]) -> Path:
    plt = _plt()
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = [r["row"] for r in results.values()]
    metric_keys = [m for m in cfg.metrics if any(m in r for r in rows)]
    lat_keys = [f"step_ms_b{b}" for b in cfg.latency_batch_sizes]
    dense = results["dense"]["row"]

    lines = [f"# Comparison: {', '.join(results)}", "",
             f"{len(prompts.prompts)} held-out prompts, {cfg.steps} denoising steps, guidance {cfg.guidance_scale}, "
             f"seed {cfg.seed}. Latency: median of {cfg.latency_repeats} denoiser calls per expert, weighted by "
             "how many evaluation prompts each expert served; measured on this machine's CPU.", "",
             ]
    header = (["model", "experts", "mean kept MACs", *metric_keys]
              + [f"ms/step (batch {b})" for b in cfg.latency_batch_sizes]
              + [f"latency vs dense (batch {cfg.latency_batch_sizes[-1]})", "s/image"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lats = [_latency(r, k) for k in lat_keys]
        rel = lats[-1] / _latency(dense, lat_keys[-1]) if lats and lats[-1] else None
        cells = [r["model"], r["num_experts"], r.get("mean_macs_ratio"), *[r.get(m) for m in metric_keys],
                 *lats, rel, r["seconds_per_image"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += ["", _verdict(rows, metric_keys), ""]
    if len(rows) >= 3:
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
        for k in range(row["num_experts"]):
            idx = (ids == k).nonzero().flatten()[: cfg.grid_per_expert]
            if len(idx) == 0:
                continue
            image_grid(images[idx], cols=len(idx)).save(fig_dir / f"{name}_expert{k}.png")
            caps = "; ".join(prompts.prompts[i] for i in idx.tolist())
            lines += [f"**expert {k}** ({row['load'][k]} prompts"
                      + (f", kept MACs {row['expert_macs_ratios'][k]:.2f}" if row.get("expert_macs_ratios") else "")
                      + f"): ![expert {k}](figures/{name}_expert{k}.png)", "", f"<sub>{caps}</sub>", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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


def _verdict(rows: list[dict[str, Any]], metric_keys: list[str]) -> str:
    """One measured sentence per other pruned model: who is better on each metric, against the first."""
    from aptp.core.plugins import default_registry

    pruned = [r for r in rows if r["model"] != "dense"]
    if len(pruned) < 2:
        return ""
    registry = default_registry()
    a, sentences = pruned[0], []
    for b in pruned[1:]:
        out = []
        for m in metric_keys:
            if a.get(m) is None or b.get(m) is None:
                continue
            higher = registry["metric"].get(m).factory.higher_is_better if m in registry["metric"] else True
            better = a if (a[m] > b[m]) == higher else b
            out.append(f"{m}: **{better['model']}** ({_fmt(a[m])} vs {_fmt(b[m])})")
        if out:
            sentences.append(f"- {a['model']} vs {b['model']} at mean kept MACs {_fmt(a.get('mean_macs_ratio'))} vs "
                             f"{_fmt(b.get('mean_macs_ratio'))}, better on " + "; ".join(out) + ".")
    return ("Measured:\n" + "\n".join(sentences)) if sentences else ""
