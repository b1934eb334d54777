"""A shortened run of the main job (``make demo`` = ``aptp compare demo``) produces every file of
the report, on the shipped world base model and evaluator."""

import json

import pytest

from aptp.cli import main

SHORT = ["aptp.pruner.steps=4", "aptp.pruner.warmup_steps=2", "aptp.pruner.phase2.steps=2",
         "aptp.pruner.data.num_samples=64", "static.pruner.finetune.steps=4", "static.pruner.data.num_samples=64",
         "eval.prompts_per_kind=3", "eval.sample_seeds=[0]", "eval.steps=3", "eval.latency_rounds=1",
         "eval.latency_repeats=1", "eval.latency_batch_sizes=[2]"]


@pytest.mark.slow
def test_short_demo_writes_the_whole_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["compare", "demo", *SHORT, "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dense", "aptp", "static"}
    for row in rows.values():
        for metric in ("world_accuracy", "world_fd", "world_mmd"):
            assert isinstance(row[metric], float), (row["model"], metric)
    assert abs(rows["static"]["mean_macs_ratio"] - 0.6) < 0.05
    for name in ("tradeoffs.png", "aptp_expert_macs.png", "aptp_difficulty.png", "static_expert0.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
        assert f"figures/{name}" in report
    assert "| dense |" in report and "| aptp |" in report and "| static |" in report
    # the paired protocol's outputs: intervals in the report, one row per model, prompt and seed
    assert "Reduced protocol" in report and "[95% CI]" in report and "per kind" in report
    records = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 9  # 3 models x 3 kinds x 3 prompts x 1 sampling seed
    keys = {"model", "prompt", "kind", "difficulty", "sample_seed", "train_seed", "expert", "kept_macs",
            "world_accuracy"}
    assert all(keys <= set(r) for r in records)
    assert {r["kind"] for r in records} == {"plain", "placed", "glyph"}
    assert all(0.0 <= r["world_accuracy"] <= 1.0 and 0.0 < r["kept_macs"] <= 1.0 for r in records)
