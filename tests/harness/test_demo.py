"""A shortened run of the main job (``make demo`` = ``aptp compare demo``) produces every file of
the report, on the shipped world base model and evaluator."""

import json

import pytest

from aptp.cli import main

SHORT = ["aptp.pruner.steps=4", "aptp.pruner.warmup_steps=2", "aptp.pruner.phase2.steps=2",
         "aptp.pruner.data.num_samples=64", "static.pruner.finetune.steps=4", "static.pruner.data.num_samples=64",
         "eval.num_prompts=8", "eval.steps=3", "eval.latency_repeats=1", "eval.latency_batch_sizes=[2]"]


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
