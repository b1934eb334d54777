"""The ablation section: neighbours, pooled effects, significant wins and figures, from synthetic
comparison results (exact expectations), and `aptp ablate` end to end on the tiny backbone."""

import json

import numpy as np
import pytest

from aptp.ablation import ablation_summary, write_ablation
from aptp.cli import main
from aptp.harness import expand_grid, grid_spec, load_comparison

AXES = {"router": ["ot", "kmeans"], "router.num_experts": ["1", "2", "4"], "granularity": ["width", "depth"]}
SHARED = {"router.num_experts=1": ["router"]}


def test_expand_grid_shares_the_cells_where_an_axis_does_not_matter():
    cells = expand_grid(AXES, SHARED)
    # K = 1 once per granularity, K = 2 / 4 once per router and granularity
    assert len(cells) == 2 + 2 * 2 * 2
    assert cells["router.num_experts=1,granularity=depth"] == {"router": "ot", "router.num_experts": "1",
                                                               "granularity": "depth"}
    assert "router=kmeans,router.num_experts=1,granularity=width" not in cells
    with pytest.raises(Exception, match="grid_shared entry"):
        expand_grid(AXES, {"router.num_experts=1": ["encoder"]})


def test_the_ablation_comparison_expands_its_grid_before_the_baselines():
    cfg = load_comparison("ablation")
    assert len(cfg.cells) == 3 * (1 + len(cfg.grid["router"]) * 3) + 2
    assert list(cfg.cells)[-2:] == ["static_magnitude", "static_best"]
    first = cfg.cells["router.num_experts=1,granularity=width"]
    assert first[:len(cfg.grid_set)] == cfg.grid_set and first[-3:] == ["router=ot", "router.num_experts=1",
                                                                         "granularity=width"]


def _synthetic(tmp_path, n=60, seeds=(0, 1)):
    """A comparison of the AXES grid + one baseline where k-means routing loses 0.3 of accuracy,
    K and granularity change nothing, and the baseline loses 0.5."""
    spec = grid_spec(AXES, SHARED)
    rng = np.random.default_rng(0)
    truth = {"dense": 0.95, "static": 0.45}
    for name, v in spec["cells"].items():
        truth[name] = 0.8 - (0.3 if v["router"] == "kmeans" and v["router.num_experts"] != "1" else 0.0)
    per_prompt, rows = [], []
    for model, p in truth.items():
        rows.append({"model": model, "train_seed": None, "mean_macs_ratio": 0.7, "expert_macs_ratios": [0.7],
                     "load": [n], "difficulty_vs_macs_spearman": None, "latency_vs_reference_b1": 0.8})
        for i in range(n):
            for s in seeds:
                per_prompt.append({"model": model, "prompt_index": i, "kind": ["plain", "glyph"][i % 2],
                                   "sample_seed": s, "train_seed": None, "world_accuracy": float(rng.random() < p)})
    results = {"eval": {"metrics": ["world_accuracy"], "reference": "dense", "bootstrap": 1000, "confidence": 0.95,
                        "sample_seeds": list(seeds), "budget": 0.7}, "seeds": [], "rows": rows, "grid": spec}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_prompt))
    return results, per_prompt


def test_ablation_summary_finds_the_effect_that_is_there_and_no_other(tmp_path):
    results, per_prompt = _synthetic(tmp_path)
    summary = ablation_summary(results, per_prompt)
    pooled = {(p["axis"], p["value"]): p for p in summary["pooled"]}
    assert pooled[("router", "kmeans")]["cells"] == 4  # K = 2, 4 x 2 granularities
    assert pooled[("router", "kmeans")]["verdict"] == "worse"
    assert pooled[("router", "kmeans")]["high"] < -0.15
    # K and granularity: the same truth on both sides; the pooled interval holds the true 0 (or
    # K=2/4 vs K=1 mixes in the k-means loss: those are worse)
    assert pooled[("granularity", "depth")]["low"] < 0.0 < pooled[("granularity", "depth")]["high"]
    cell = summary["cells"]["router=kmeans,router.num_experts=2,granularity=depth"]
    assert cell["neighbours"]["router"]["vs"] == "router=ot,router.num_experts=2,granularity=depth"
    assert cell["neighbours"]["router.num_experts"]["vs"] == "router.num_experts=1,granularity=depth"
    assert cell["neighbours"]["granularity"]["vs"] == "router=kmeans,router.num_experts=2,granularity=width"
    assert summary["best_static"] == "static"
    assert cell["baselines"]["static"]["verdict"] == "no significant difference" or cell["baselines"]["static"]["low"] < 0.2
    # the K = 1 cell has no router neighbour (the router does not matter there)
    assert "router" not in summary["cells"]["router.num_experts=1,granularity=width"]["neighbours"]
    wins = np.asarray(summary["wins"], dtype=float)
    assert np.allclose(np.nan_to_num(wins), -np.nan_to_num(wins).T)
    i, j = summary["models"].index("router=ot,router.num_experts=2,granularity=width"), summary["models"].index("static")
    assert wins[i, j] > 0.2


def test_write_ablation_writes_tables_json_and_figures(tmp_path):
    _synthetic(tmp_path)
    report = write_ablation(tmp_path).read_text()
    assert "## Pooled effects" in report and "| router | kmeans | ot | 4 |" in report
    assert "| * | 1 | width |" in report  # the shared K = 1 cell
    assert "**↓**" in report  # a significant loss is marked
    assert json.loads((tmp_path / "ablation.json").read_text())["metric"] == "world_accuracy"
    for fig in ("ablation_quality_vs_k.png", "ablation_wins.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_ablate_cli_two_cells_resumes_and_refuses_a_changed_config(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "smoke", "--grid", "router=ot,kmeans", "router.num_experts=1,2",
            "--shared", "router.num_experts=1:router",
            "--set", "backbone.resolution=16", "pruner.progress=false",
            "--eval", "prompts_per_kind=3", "sample_seeds=[0,1]", "steps=2", "metrics=[world_accuracy]",
            "latency_batch_sizes=[2]", "latency_rounds=1", "latency_repeats=1", "bootstrap=1000",
            "grid_per_expert=2", "--output-dir", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "router.num_experts=1", "router=ot,router.num_experts=2",
                                          "router=kmeans,router.num_experts=2"]
    report = (out / "ablation.md").read_text()
    assert "world_accuracy [95 %]" in report and "Δ vs K=1" in report and "Δ vs router=ot" in report
    assert report.count(" [") >= 6  # intervals in the cell and difference columns
    assert "| latency b2 |" in report
    for fig in ("ablation_quality_vs_k.png", "ablation_wins.png", "tradeoffs.png"):
        assert (out / "figures" / fig).is_file()

    def outputs():
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cells").rglob("*")
                if p.name == "summary.json" or p.suffix == ".safetensors"}

    finished = outputs()
    assert main(args + ["--reuse-evaluations"]) == 0  # resumable: nothing is trained again, nor evaluated
    assert outputs() == finished
    assert json.loads((out / "results.json").read_text())["reused"] == [r["model"] for r in rows[1:]]
    changed = [a if a != "pruner.progress=false" else "pruner.phase2.steps=3" for a in args]
    assert main(changed) == 2  # a changed config: refused in one line, nothing rewritten
    assert "holds results of a different run (pruner.phase2.steps: 2 → 3)" in capsys.readouterr().err
    assert outputs() == finished


def test_training_curves_say_whether_fine_tuning_had_flattened(tmp_path):
    from aptp.reporting import training_curves

    def cell(name, decay):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text("pruner: {target_ratio: 0.6}\n")
        p1 = [{"step": s, "mean_ratio": 1.0 - 0.4 * min(1.0, s / 50), "code_ratios": [0.6, 0.62]}
              for s in range(0, 100, 10)]
        (folder / "phase1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in p1) + '{"step": 10')  # cut line
        p2 = [{"expert": k, "step": s, "distill": 0.1 * (1 + s) ** -decay} for k in (0, 1) for s in range(200)]
        (folder / "phase2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in p2))
        return folder

    lines = training_curves({"falling": cell("falling", 1.0), "flat": cell("flat", 0.0)}, tmp_path)
    text = "\n".join(lines)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| f")}
    assert rows["falling"].startswith("| falling | 91 | 50 | 0.60 / 0.62 | 400 |")
    assert rows["falling"].endswith("| still falling |") and rows["flat"].endswith("| 0.000 | flat |")
    assert (tmp_path / "curves_falling.png").stat().st_size > 1000


def test_cells_are_paired_at_equal_measured_latency_only_within_the_tolerance(tmp_path):
    results, per_prompt = _synthetic(tmp_path)
    rows = {r["model"]: r for r in results["rows"]}
    fast_width = "router.num_experts=1,granularity=width"
    for name, v in results["grid"]["cells"].items():  # depth cells 0.70 of dense, width cells 0.80 but one
        rows[name]["latency_vs_reference_b1"] = 0.70 if v["granularity"] == "depth" else 0.80
    rows[fast_width]["latency_vs_reference_b1"] = 0.72
    results["eval"]["latency_batch_sizes"] = [1]
    summary = ablation_summary(results, per_prompt)
    depth = next(m for m in summary["latency_matched"] if m["axis"] == "granularity" and m["value"] == "depth")
    assert depth["cells"] == 5 and {p["partner"] for p in depth["pairs"]} == {fast_width}
    assert "estimate" in depth and depth["low"] < 0.0 < depth["high"] or depth["verdict"]
    rows[fast_width]["latency_vs_reference_b1"] = 0.80  # now no width cell is within 0.03 of a depth cell
    summary = ablation_summary(results, per_prompt)
    depth = next(m for m in summary["latency_matched"] if m["axis"] == "granularity" and m["value"] == "depth")
    assert depth["cells"] == 0 and "estimate" not in depth
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = write_ablation(tmp_path).read_text()
    assert "## At equal measured latency" in report
    assert (tmp_path / "figures" / "ablation_quality_vs_latency.png").is_file()
