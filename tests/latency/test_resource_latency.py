"""``resource: latency`` in both pruners, on the tiny backbone at 16 px. The latency model's timer
is a deterministic fake (MACs plus a fixed cost per module call, so latency is not proportional to
MACs): no assertion here depends on a real clock."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aptp.core.errors import ConfigError
from aptp.latency.profiled import ProfiledLatency

from fake_timers import dispatch_timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "procedures"))
from runs import read_log, run_experiment  # noqa: E402


@pytest.fixture
def fake_clock(monkeypatch, tmp_path):
    monkeypatch.setattr(ProfiledLatency, "_timer", lambda self, device: dispatch_timer)
    return ["pruner.resource=latency", f"pruner.latency_model={{name: profiled, buckets: 4, cache_dir: '{tmp_path / 'cache'}'}}"]


def test_aptp_resource_latency_moves_the_predicted_latency_to_the_target(tmp_path, fake_clock):
    overrides = ["router.num_experts=2", "pruner.steps=80", "pruner.warmup_steps=5", "pruner.batch_size=4",
                 "pruner.lr=0.1", "pruner.scale_lr=false", "pruner.log_every=1", "pruner.checkpoint_every=1000",
                 "pruner.phase2.steps=0", "pruner.data.num_samples=16", "pruner.target_ratio=0.5",
                 "pruner.weights={denoise: 0, distill: 0, block: 0, resource: 2.0, spread: 0, contrastive: 0}"]
    _, summary = run_experiment(tmp_path / "run", [*overrides, *fake_clock])
    log = read_log(tmp_path / "run" / "phase1.jsonl")
    first, last = log[0]["mean_ratio"], log[-1]["mean_ratio"]
    assert abs(last - 0.5) < abs(first - 0.5) and abs(last - 0.5) < 0.1, (first, last)
    assert len(summary["expert_latency_ratios"]) == 2 and len(summary["expert_macs_ratios"]) == 2
    # latency is not MACs here: the same codes have another latency ratio than kept-MACs ratio
    assert summary["expert_latency_ratios"] != summary["expert_macs_ratios"]


def test_static_latency_budget_meets_the_target(tmp_path, fake_clock):
    static = ["pruner=static", "router=single", "assignment=magnitude", "pruner.finetune.steps=0",
              "pruner.data.num_samples=8", "pruner.target_ratio=0.6"]
    _, summary = run_experiment(tmp_path / "lat", [*static, *fake_clock])
    (lat,) = summary["expert_latency_ratios"]
    assert 0.55 <= lat <= 0.6 + 1e-9, lat
    _, macs = run_experiment(tmp_path / "macs", static)  # the default: a kept-MACs budget
    assert "expert_latency_ratios" not in macs and 0.55 <= macs["expert_macs_ratios"][0] <= 0.6
    assert macs["expert_macs_ratios"] != summary["expert_macs_ratios"]


def test_unknown_resource_and_bad_latency_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'macs' or 'latency'"):
        run_experiment(tmp_path, ["pruner.resource=flops"])
    with pytest.raises(ConfigError, match="mapping with a 'name'"):
        run_experiment(tmp_path, ["pruner.resource=latency", "pruner.latency_model={buckets: 2}"])
