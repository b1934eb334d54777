"""``compare(..., reuse_evaluations=True)`` / ``aptp compare --reuse-evaluations``: a cell's previous
evaluation is reused only when the eval config (latency aside), the cell's summary and dense's
re-evaluation all match; latency is always measured again."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

import aptp.harness as harness
from aptp.harness import EvalConfig, compare

# a static cell: seconds to train on the tiny backbone
CELL = ["backbone.resolution=16", "pruner=static", "router=single", "assignment=magnitude",
        "pruner.finetune.steps=1", "pruner.finetune.batch_size=4", "pruner.data.num_samples=8", "pruner.progress=false"]
SECOND = [*CELL[:4], "pruner.finetune.steps=2", *CELL[5:]]
LATENCY = ("step_ms_b2", "routed_ms_b2", "latency_vs_reference_b2")


def _cfg(**changes) -> EvalConfig:
    base = dict(prompts_per_kind=2, sample_seeds=[0], steps=2, metrics=["world_accuracy"], latency_batch_sizes=[2],
                latency_rounds=1, latency_repeats=1, grid_per_expert=2, bootstrap=1000)
    return EvalConfig(**{**base, **changes})


def _read(out):
    results = json.loads((out / "results.json").read_text())
    per_prompt = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines() if line]
    return results, per_prompt


def _spy(monkeypatch) -> tuple[Counter, list]:
    """Counts evaluate_pipeline calls per model name and records the models measure_latency timed
    (both call through to the real functions)."""
    calls, timed = Counter(), []
    real_eval, real_latency = harness.evaluate_pipeline, harness.measure_latency

    def evaluate_pipeline(name, *args, **kwargs):
        calls[name] += 1
        return real_eval(name, *args, **kwargs)

    def measure_latency(results, *args, **kwargs):
        timed.append(sorted(results))
        return real_latency(results, *args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_pipeline", evaluate_pipeline)
    monkeypatch.setattr(harness, "measure_latency", measure_latency)
    return calls, timed


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished one-cell comparison (dense + 'a')."""
    out = tmp_path_factory.mktemp("reuse") / "first"
    compare("smoke", {"a": CELL}, _cfg(), out, progress=False)
    return out


def _copy(first_run, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(first_run, out)
    return out


def test_an_added_cell_reuses_the_unchanged_cells_evaluation(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    before, before_pp = _read(out)
    calls, timed = _spy(monkeypatch)
    compare("smoke", {"a": CELL, "b": SECOND}, _cfg(), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1, "b": 1})  # 'a' was not generated again
    after, after_pp = _read(out)
    assert after["reused"] == ["a"] and list(after["reused_from"]) == ["a"]
    assert after["reused_from"]["a"] == before["code_revision"] and "commit" in after["code_revision"]
    # the reused rows equal the full evaluation's (latency aside, measured again)
    assert [r for r in after_pp if r["model"] == "a"] == [r for r in before_pp if r["model"] == "a"]
    old_a, new_a = (next(r for r in res["rows"] if r["model"] == "a") for res in (before, after))
    assert {k: v for k, v in new_a.items() if k not in LATENCY} == {k: v for k, v in old_a.items() if k not in LATENCY}
    # latency measured again for every model, interleaved in one timing run
    assert timed == [["a", "b", "dense"]]
    assert [r["model"] for r in after["rows"]] == ["dense", "a", "b"]
    for row in after["rows"]:
        assert all(k in row for k in LATENCY), row["model"]
    report = (out / "report.md").read_text()
    assert "**Reused evaluations.** a (evaluated at aptp" in report
    assert "Images not regenerated: evaluation reused" in report
    assert (out / "figures" / "b_expert0.png").is_file()


def test_without_the_flag_every_cell_is_evaluated_again(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    calls, _ = _spy(monkeypatch)
    compare("smoke", {"a": CELL}, _cfg(), out, progress=False)
    assert calls == Counter({"dense": 1, "a": 1})
    assert _read(out)[0]["reused"] == []


def test_a_changed_eval_field_reuses_nothing(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    calls, _ = _spy(monkeypatch)
    with pytest.warns(UserWarning, match=r"another eval config \(steps\)"):
        compare("smoke", {"a": CELL}, _cfg(steps=3), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1, "a": 1})
    assert _read(out)[0]["reused"] == []


@pytest.mark.parametrize("change", [{"latency_rounds": 2}, {"pairs": ["a:dense"], "confidence": 0.9}])
def test_a_changed_latency_or_reporting_setting_still_reuses(first_run, tmp_path, monkeypatch, change):
    out = _copy(first_run, tmp_path)
    calls, _ = _spy(monkeypatch)
    compare("smoke", {"a": CELL}, _cfg(**change), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1})
    assert _read(out)[0]["reused"] == ["a"]


def test_dense_not_reproducing_reuses_nothing(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    lines = (out / "per_prompt.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["model"] == "dense"
    rec["world_accuracy"] = 0.5 if rec["world_accuracy"] != 0.5 else 0.25
    (out / "per_prompt.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    calls, _ = _spy(monkeypatch)
    with pytest.warns(UserWarning, match="dense no longer reproduces its previous evaluation"):
        compare("smoke", {"a": CELL}, _cfg(), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1, "a": 1})
    assert _read(out)[0]["reused"] == []


def test_a_retrained_cell_is_not_reused(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    results = json.loads((out / "results.json").read_text())
    results["summaries"]["a"] = {**results["summaries"]["a"], "changed": True}  # as if trained again since
    (out / "results.json").write_text(json.dumps(results))
    calls, _ = _spy(monkeypatch)
    compare("smoke", {"a": CELL}, _cfg(), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1, "a": 1})
    assert _read(out)[0]["reused"] == []


def test_a_cell_retrained_from_another_config_is_not_reused(first_run, tmp_path, monkeypatch):
    out = _copy(first_run, tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["cell_fingerprints"]["a"]  # recorded for every cell
    results["cell_fingerprints"]["a"] = "0" * 64  # as if the folder held another config's run then
    (out / "results.json").write_text(json.dumps(results))
    calls, _ = _spy(monkeypatch)
    compare("smoke", {"a": CELL}, _cfg(), out, progress=False, reuse_evaluations=True)
    assert calls == Counter({"dense": 1, "a": 1})
    assert _read(out)[0]["reused"] == []


def test_the_cli_flag_reaches_compare(first_run, tmp_path, monkeypatch, capsys):
    from aptp.cli import main

    out = _copy(first_run, tmp_path)
    spec = tmp_path / "cmp.yaml"
    spec.write_text(json.dumps({"name": "reuse", "base": "smoke", "cells": {"a": CELL}, "eval": {
        "prompts_per_kind": 2, "sample_seeds": [0], "steps": 2, "metrics": ["world_accuracy"],
        "latency_batch_sizes": [2], "latency_rounds": 1, "latency_repeats": 1, "grid_per_expert": 2,
        "bootstrap": 1000}}))
    calls, _ = _spy(monkeypatch)
    assert main(["compare", str(spec), "--output-dir", str(out), "--reuse-evaluations"]) == 0
    assert calls == Counter({"dense": 1})
    assert _read(out)[0]["reused"] == ["a"]
