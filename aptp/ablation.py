"""The ablation section of a comparison whose cells form a grid (``aptp compare`` on a file with
``grid:``, or ``aptp ablate``): what each axis of the grid changes, with intervals.

Everything here is computed from what :func:`aptp.harness.compare` wrote (``results.json`` and
``per_prompt.jsonl``), so the section can be rewritten without generating an image again::

    write_ablation("runs/ablation")      # -> runs/ablation/ablation.md, ablation.json, figures/

Every cell is compared, on the same prompts and noise (paired), with its *neighbours*: the cell that
differs from it only in one axis, at that axis' first value (``router.num_experts=1`` of the same
granularity; ``router=ot`` at the same K and granularity; ``granularity=width`` at the same router
and K), and with every baseline (the comparison's cells outside the grid, e.g. static pruning).
Per axis value, the *pooled effect* averages those paired differences over the other axes first
(one value per prompt), so "k-means routing vs OT routing" is one interval over every K and
granularity. A difference is "better" / "worse" only when its interval excludes zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aptp.stats import Interval, bootstrap_mean, verdict

ABLATION_FILE = "ablation.md"
#: two cells count as equally fast when their latency ratios to dense differ by at most this much
LATENCY_TOLERANCE = 0.03


def _load(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from aptp.core.errors import reading

    with reading(out_dir / "results.json", "comparison results", "Run the comparison again to rewrite it."):
        results = json.loads((out_dir / "results.json").read_text())
    with reading(out_dir / "per_prompt.jsonl", "per-prompt scores", "Run the comparison again to rewrite it."):
        per_prompt = [json.loads(line) for line in (out_dir / "per_prompt.jsonl").read_text().splitlines() if line]
    return results, per_prompt


class _Scores:
    """Per-prompt scores of one metric, (N,) per model, averaged over sampling and training seeds."""

    def __init__(self, per_prompt: Sequence[Mapping[str, Any]], metric: str | None) -> None:
        self.n = max((r["prompt_index"] for r in per_prompt), default=-1) + 1
        kinds: list[Any] = [None] * self.n
        acc: dict[str, np.ndarray] = {}
        cnt: dict[str, np.ndarray] = {}
        for r in per_prompt:
            kinds[r["prompt_index"]] = r.get("kind")
            v = r.get(metric) if metric else None
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            a = acc.setdefault(r["model"], np.zeros(self.n))
            c = cnt.setdefault(r["model"], np.zeros(self.n))
            a[r["prompt_index"]] += v
            c[r["prompt_index"]] += 1
        with np.errstate(invalid="ignore"):
            self.table = {m: acc[m] / cnt[m] for m in acc}  # model -> (N,)
        self.strata = kinds if all(k is not None for k in kinds) else None

    def interval(self, x: np.ndarray, n_boot: int, confidence: float) -> Interval | None:
        ok = ~np.isnan(x)
        if not ok.any():
            return None
        strata = [self.strata[i] for i in np.flatnonzero(ok)] if self.strata else None
        return bootstrap_mean(x[ok], strata=strata, n_boot=n_boot, confidence=confidence)


def _neighbour(values: Mapping[str, str], axis: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """``values`` with ``axis`` at its first value, then the grid's shared rules applied (the axes
    that do not matter there take their first value, as :func:`aptp.harness.expand_grid` does)."""
    axes = spec["axes"]
    out = dict(values)
    out[axis] = axes[axis][0]
    for cond, dropped in spec.get("shared", {}).items():
        key, value = cond.split("=", 1)
        if out.get(key) == value:
            for d in dropped:
                out[d] = axes[d][0]
    return out


def _label(axis: str) -> str:
    return "K" if axis.endswith("num_experts") else axis.rsplit(".", 1)[-1]


def ablation_summary(results: Mapping[str, Any], per_prompt: Sequence[Mapping[str, Any]],
                     spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The numbers of the ablation section (see the module docstring); ``spec`` defaults to the
    grid stored in ``results`` (``results["grid"]``, :func:`aptp.harness.grid_spec`)."""
    spec = spec or results.get("grid") or {}
    if not spec.get("cells"):
        raise ValueError("these results hold no grid (results.json has no 'grid' with cells); "
                         "run a comparison with grid: or `aptp ablate`.")
    cfg = results["eval"]
    boot = {"n_boot": int(cfg.get("bootstrap", 2000)), "confidence": float(cfg.get("confidence", 0.95))}
    rows = {r["model"]: r for r in results["rows"] if r.get("train_seed") in (None, (results.get("seeds") or [None])[0])}
    cells: dict[str, dict[str, str]] = {c: v for c, v in spec["cells"].items() if c in rows}
    by_values = {tuple(sorted(v.items())): c for c, v in cells.items()}
    baselines = [m for m in rows if m not in cells and m != cfg.get("reference", "dense") and m != "dense"]
    # the first metric with a value per image (e.g. world_accuracy); none: MACs and latency only
    metric = next((m for m in cfg.get("metrics", []) if per_prompt and m in per_prompt[0]), None)
    scores = _Scores(per_prompt, metric)
    table = scores.table

    def diff(a: str, b: str) -> dict[str, Any] | None:
        if a not in table or b not in table:
            return None
        iv = scores.interval(table[a] - table[b], **boot)
        return None if iv is None else {"vs": b, **iv.as_dict(), "verdict": verdict(iv)}

    best_static = max((b for b in baselines if b in table), key=lambda m: float(np.nanmean(table[m])), default=None)
    out_cells: dict[str, Any] = {}
    for name, values in cells.items():
        row = rows[name]
        iv = scores.interval(table[name], **boot) if name in table else None
        entry: dict[str, Any] = {
            "axes": values, "quality": iv.as_dict() if iv else None,
            "deployed_macs": row.get("mean_macs_ratio"), "expert_macs": row.get("expert_macs_ratios"),
            "load": row.get("load"), "spearman_difficulty_macs": row.get("difficulty_vs_macs_spearman"),
            "latency_vs_dense": {k.rsplit("_", 1)[-1]: v for k, v in row.items() if k.startswith("latency_vs_reference_")},
            "routed_ms": {k.rsplit("_", 1)[-1]: v.get("median_ms") for k, v in row.items()
                          if k.startswith("routed_ms_") and isinstance(v, Mapping)},
            "neighbours": {}, "baselines": {},
        }
        for axis in spec["axes"]:
            other = by_values.get(tuple(sorted(_neighbour(values, axis, spec).items())))
            if other is not None and other != name:
                entry["neighbours"][axis] = diff(name, other)
        for b in baselines:
            entry["baselines"][b] = diff(name, b)
        out_cells[name] = entry

    pooled: list[dict[str, Any]] = []
    for axis, axis_values in spec["axes"].items():
        for value in axis_values[1:]:
            members = [(c, e["neighbours"][axis]["vs"]) for c, e in out_cells.items()
                       if e["axes"][axis] == value and e["neighbours"].get(axis)]
            if not members:
                continue
            d = np.nanmean(np.stack([table[a] - table[b] for a, b in members]), axis=0)  # (N,) per prompt
            iv = scores.interval(d, **boot)
            if iv is not None:
                pooled.append({"axis": axis, "value": value, "vs": axis_values[0], "cells": len(members),
                               **iv.as_dict(), "verdict": verdict(iv)})
    matched = _latency_matched(out_cells, spec["axes"], list(cfg.get("latency_batch_sizes", [])), table, scores, boot)
    # every pair of models (grid and baselines): significant wins of the row over the column
    models = [m for m in list(cells) + baselines if m in table]
    wins = np.full((len(models), len(models)), np.nan)
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            if i < j:
                iv = scores.interval(table[a] - table[b], **boot)
                if iv is not None and iv.excludes_zero():
                    wins[i, j], wins[j, i] = iv.estimate, -iv.estimate
    dense = {"estimate": float(np.nanmean(table["dense"]))} if "dense" in table else None
    return {"metric": metric or "(no per-image metric)", "n_prompts": scores.n, "sample_seeds": cfg.get("sample_seeds"), "budget": cfg.get("budget"),
            "confidence": boot["confidence"], "latency_batch_sizes": list(cfg.get("latency_batch_sizes", [])),
            "axes": spec["axes"], "shared": spec.get("shared", {}),
            "cells": out_cells, "pooled": pooled, "latency_matched": matched, "latency_tolerance": LATENCY_TOLERANCE,
            "best_static": best_static,
            "baselines": {b: {**(scores.interval(table[b], **boot).as_dict() if b in table else {}),
                              "deployed_macs": rows[b].get("mean_macs_ratio"),
                              "latency_vs_dense": {k.rsplit("_", 1)[-1]: v for k, v in rows[b].items()
                                                   if k.startswith("latency_vs_reference_")}}
                          for b in baselines},
            "dense": dense, "models": models, "wins": wins.tolist()}


def _latency_matched(cells: Mapping[str, Any], axes: Mapping[str, Sequence[str]], batches: Sequence[int],
                     table: Mapping[str, np.ndarray], scores: _Scores, boot: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per axis, batch size and non-first axis value: each cell paired with the cell at the axis'
    first value whose measured latency (ratio to dense) is closest and within LATENCY_TOLERANCE,
    then pooled per prompt over those pairs (one interval). A value none of whose cells has such a
    partner gets ``cells: 0`` and no interval: it cannot be compared at equal latency."""
    out: list[dict[str, Any]] = []
    for axis, values in axes.items():
        for b in batches:
            key = f"b{b}"
            lat = {c: e["latency_vs_dense"].get(key) for c, e in cells.items()}
            first = [c for c, e in cells.items() if e["axes"][axis] == values[0] and lat[c] is not None and c in table]
            for value in values[1:]:
                pairs = []
                for c, e in cells.items():
                    if e["axes"][axis] != value or lat[c] is None or c not in table or not first:
                        continue
                    partner = min(first, key=lambda o: abs(lat[o] - lat[c]))
                    if abs(lat[partner] - lat[c]) <= LATENCY_TOLERANCE:
                        pairs.append((c, partner))
                entry: dict[str, Any] = {"axis": axis, "value": value, "vs": values[0], "batch": b,
                                         "cells": len(pairs),
                                         "pairs": [{"cell": c, "partner": o, "latency": lat[c],
                                                    "partner_latency": lat[o]} for c, o in pairs]}
                if pairs:
                    d = np.nanmean(np.stack([table[c] - table[o] for c, o in pairs]), axis=0)  # (N,) per prompt
                    iv = scores.interval(d, **boot)
                    if iv is not None:
                        entry.update(iv.as_dict(), verdict=verdict(iv))
                out.append(entry)
    return out


def _ci(d: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not d:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    mark = ""
    if signed and d.get("verdict") not in (None, "no significant difference"):
        mark = " **↑**" if d["verdict"] == "better" else " **↓**"
    return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]{mark}"


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _figures(summary: Mapping[str, Any], fig_dir: Path) -> list[str]:
    from aptp.reporting import _plt

    plt = _plt()
    fig_dir.mkdir(parents=True, exist_ok=True)
    axes, cells, metric = summary["axes"], summary["cells"], summary["metric"]
    numeric = [a for a, vals in axes.items() if all(v.replace(".", "", 1).isdigit() for v in vals)]
    written = []
    if numeric:
        x_axis = numeric[0]
        rest = [a for a in axes if a != x_axis]
        line_axis = rest[0] if rest else None
        panel_axis = rest[1] if len(rest) > 1 else None
        panels = axes[panel_axis] if panel_axis else [None]
        fig, subplots = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
        for ax, panel in zip(subplots[0], panels):
            for line in (axes[line_axis] if line_axis else [None]):
                pts = []
                for name, e in cells.items():
                    v = e["axes"]
                    if panel_axis and v[panel_axis] != panel:
                        continue
                    shared_here = line_axis and not any(f"{line_axis}=" in part for part in name.split(","))
                    if line_axis and v[line_axis] != line and not shared_here:
                        continue
                    if e.get("quality"):
                        pts.append((float(v[x_axis]), e["quality"]))
                pts.sort(key=lambda p: p[0])
                if pts:
                    xs = [p[0] for p in pts]
                    ys = np.asarray([p[1]["estimate"] for p in pts])
                    err = np.asarray([[p[1]["estimate"] - p[1]["low"] for p in pts],
                                      [p[1]["high"] - p[1]["estimate"] for p in pts]])
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=str(line) if line else metric)
            for b, e in summary["baselines"].items():
                if "estimate" not in e:
                    continue
                ax.axhline(e["estimate"], ls="--", lw=1, color="grey")
                ax.text(ax.get_xlim()[0] if ax.lines else 1, e["estimate"], f" {b}", fontsize=7, va="bottom", color="grey")
            if summary.get("dense"):
                ax.axhline(summary["dense"]["estimate"], ls=":", lw=1, color="black")
            ax.set_xscale("log", base=2)
            ax.set_xticks([float(v) for v in axes[x_axis]], axes[x_axis])
            ax.set_xlabel(_label(x_axis))
            ax.set_title(f"{_label(panel_axis)}={panel}" if panel_axis else "")
            ax.grid(alpha=0.3)
        subplots[0][0].set_ylabel(f"{metric} ({int(summary['confidence'] * 100)} % interval)")
        subplots[0][0].legend(fontsize=8, title=_label(line_axis) if line_axis else None)
        fig.tight_layout()
        fig.savefig(fig_dir / "ablation_quality_vs_k.png", dpi=120)
        plt.close(fig)
        written.append("ablation_quality_vs_k.png")
    batches = summary.get("latency_batch_sizes", [])
    if batches and any(e["latency_vs_dense"] for e in cells.values()):
        colour_axis = "granularity" if "granularity" in axes else list(axes)[-1]
        fig, subplots = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 3.8), sharey=True, squeeze=False)
        for ax, b in zip(subplots[0], batches):
            for value in axes[colour_axis]:
                pts = [(e["latency_vs_dense"].get(f"b{b}"), e["quality"]) for e in cells.values()
                       if e["axes"][colour_axis] == value and e.get("quality") and e["latency_vs_dense"].get(f"b{b}")]
                if pts:
                    ys = np.asarray([q["estimate"] for _, q in pts])
                    err = np.asarray([[q["estimate"] - q["low"] for _, q in pts], [q["high"] - q["estimate"] for _, q in pts]])
                    ax.errorbar([x for x, _ in pts], ys, yerr=err, fmt="o", capsize=2, label=str(value))
            for name, e in summary["baselines"].items():
                x = e["latency_vs_dense"].get(f"b{b}")
                if x is not None and "estimate" in e:
                    ax.plot([x], [e["estimate"]], "k^")
                    ax.annotate(f" {name}", (x, e["estimate"]), fontsize=7)
            ax.set_xlabel(f"measured latency / dense (batch {b})")
            ax.grid(alpha=0.3)
        subplots[0][0].set_ylabel(f"{metric} ({int(summary['confidence'] * 100)} % interval)")
        subplots[0][0].legend(fontsize=8, title=_label(colour_axis))
        fig.tight_layout()
        fig.savefig(fig_dir / "ablation_quality_vs_latency.png", dpi=120)
        plt.close(fig)
        written.append("ablation_quality_vs_latency.png")
    models = summary["models"]
    wins = np.asarray(summary["wins"], dtype=float)
    if len(models) > 1:
        size = 0.32 * len(models) + 3
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        lim = np.nanmax(np.abs(wins)) if np.isfinite(wins).any() else 1.0
        im = ax.imshow(np.ma.masked_invalid(wins), cmap="RdBu", vmin=-lim, vmax=lim)
        short = [_short(m, summary) for m in models]
        ax.set_xticks(range(len(models)), short, rotation=90, fontsize=7)
        ax.set_yticks(range(len(models)), short, fontsize=7)
        ax.set_title(f"significant paired differences of {summary['metric']} (row − column); blank: interval holds 0",
                     fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.7)
        fig.tight_layout()
        fig.savefig(fig_dir / "ablation_wins.png", dpi=120)
        plt.close(fig)
        written.append("ablation_wins.png")
    return written


def _short(model: str, summary: Mapping[str, Any]) -> str:
    """``router=ot,router.num_experts=2,granularity=width`` -> ``ot K2 width``."""
    e = summary["cells"].get(model)
    if e is None:
        return model
    parts = []
    for axis, value in e["axes"].items():
        if f"{axis}={value}" not in model.split(","):
            continue  # a shared axis (does not matter in this cell)
        parts.append(f"K{value}" if _label(axis) == "K" else value)
    return " ".join(parts)


def write_ablation(out_dir: str | Path, spec: Mapping[str, Any] | None = None) -> Path:
    """Write ``ablation.md``, ``ablation.json`` and the figures ``ablation_quality_vs_k.png`` and
    ``ablation_wins.png`` into ``out_dir`` (a finished comparison with a grid); returns the report."""
    out_dir = Path(out_dir)
    results, per_prompt = _load(out_dir)
    summary = ablation_summary(results, per_prompt, spec)
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    figures = _figures(summary, out_dir / "figures")
    metric, axes = summary["metric"], summary["axes"]
    conf = int(round(summary["confidence"] * 100))
    lines = [f"# Ablation: {' × '.join(_label(a) for a in axes)}", "",
             f"{summary['n_prompts']} held-out prompts × sampling seeds {summary['sample_seeds']}, paired (same noise in "
             f"every model); {conf} % bootstrap intervals over prompts (stratified by kind). Differences are paired "
             f"({metric}, cell − other); **↑** / **↓**: the interval excludes 0. Budget: "
             f"{summary['budget'] if summary['budget'] is not None else 'not set'} of the dense MACs.", ""]
    if summary.get("dense"):
        lines += [f"Dense model: {metric} {summary['dense']['estimate']:.3f}.", ""]
    first = {a: vals[0] for a, vals in axes.items()}
    lines += ["## Pooled effects", "",
              "Each axis value against the axis' first value, the paired difference averaged over the other axes "
              "per prompt first (one interval over every matching cell).", "",
              "| axis | value | vs | cells | Δ " + metric + f" [{conf} %] | verdict |", "|---|---|---|---|---|---|"]
    for p in summary["pooled"]:
        lines.append(f"| {_label(p['axis'])} | {p['value']} | {p['vs']} | {p['cells']} | "
                     f"{_ci(p, signed=True)} | {p['verdict']} |")
    if summary.get("latency_matched"):
        tol = summary["latency_tolerance"]
        lines += ["", "## At equal measured latency", "",
                  f"Each cell paired with the cell at the axis' first value (any other axis may differ) whose measured "
                  f"latency (routed denoising step / dense, batch b) is closest and within ±{tol:.2f} of it; the paired "
                  "differences pooled per prompt. *cells*: how many cells found such a partner (0: this value cannot be "
                  "compared at equal latency in this grid).", "",
                  "| axis | value | vs | batch | cells | Δ " + metric + f" [{conf} %] | verdict | pairs (latency) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in summary["latency_matched"]:
            pairs = "; ".join(f"{_short(p['cell'], summary)} ({p['latency']:.2f}) – {_short(p['partner'], summary)} "
                              f"({p['partner_latency']:.2f})" for p in m["pairs"]) or "–"
            lines.append(f"| {_label(m['axis'])} | {m['value']} | {m['vs']} | {m['batch']} | {m['cells']} | "
                         f"{_ci(m if 'estimate' in m else None, signed=True)} | {m.get('verdict', '–')} | {pairs} |")
    best = summary["best_static"]
    lines += ["", "## Every cell", "",
              f"Δ columns: against the cell at the axis' first value ({', '.join(f'{_label(a)}={v}' for a, v in first.items())}) "
              f"and against the best baseline ({best or 'none'}). MACs: deployed mean (load-weighted) and per expert. "
              "ρ: Spearman(prompt difficulty, kept MACs of its expert). Latency: routed denoising step / dense, "
              "thread CPU time (see report.md).", ""]
    head = [_label(a) for a in axes] + [f"{metric} [{conf} %]"] + [f"Δ vs {_label(a)}={v}" for a, v in first.items()]
    batches = [f"b{b}" for b in summary.get("latency_batch_sizes", [])]
    head += [f"Δ vs {best}" if best else "Δ vs baseline", "MACs", "expert MACs", "ρ"] + [f"latency {b}" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary["cells"].items():
        cells_axes = [(e["axes"][a] if f"{a}={e['axes'][a]}" in name.split(",") else "*") for a in axes]
        nb = [_ci(e["neighbours"].get(a), signed=True) for a in axes]
        lat = e["latency_vs_dense"]
        lines.append("| " + " | ".join(cells_axes + [_ci(e["quality"])] + nb + [
            _ci(e["baselines"].get(best), signed=True) if best else "–", _f(e["deployed_macs"]),
            " / ".join(f"{m:.2f}" for m in e["expert_macs"] or []), _f(e["spearman_difficulty_macs"], 2),
            ] + [_f(lat.get(b), 2) for b in batches]) + " |")
    if summary["baselines"]:
        lines += ["", "## Baselines", "",
                  "| " + " | ".join(["baseline", f"{metric} [{conf} %]", "MACs"] + [f"latency {b}" for b in batches]) + " |",
                  "|---|---|---|" + "---|" * len(batches)]
        for b, e in summary["baselines"].items():
            lines.append("| " + " | ".join([b, _ci(e if "estimate" in e else None), _f(e["deployed_macs"])]
                                           + [_f(e["latency_vs_dense"].get(x), 2) for x in batches]) + " |")
    lines += ["", "`*`: an axis that does not matter in that cell (shared: "
              + (", ".join(f"{k} → {', '.join(v)}" for k, v in summary["shared"].items()) or "none") + ")."]
    for fig in figures:
        lines += ["", f"![{fig}](figures/{fig})"]
    path = out_dir / ABLATION_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aptp.ablation OUT_DIR [COMPARISON]``: rewrite the ablation section of a finished
    comparison (the grid from its results.json, or from the comparison file named)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m aptp.ablation", description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("comparison", nargs="?", help="comparison name or YAML whose grid to use")
    args = parser.parse_args(argv)
    spec = None
    if args.comparison:
        from aptp.harness import load_comparison

        spec = load_comparison(args.comparison).grid_spec()
    print(write_ablation(args.out_dir, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
