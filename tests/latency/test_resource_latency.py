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


def _dense_ms(message: str) -> float:
    """The dense model's predicted ms, read from the refusal of a target above it."""
    import re

    return float(re.search(r"predicted latency \(([0-9.]+) ms\)", message).group(1))


def test_static_target_in_milliseconds(tmp_path, fake_clock):
    """``target_ms`` is converted with the latency model's dense prediction: a target above the dense
    model is refused in one line (naming its ms), 0.6 x that ms prunes to a latency ratio <= 0.6."""
    static = ["pruner=static", "router=single", "assignment=magnitude", "pruner.finetune.steps=0",
              "pruner.data.num_samples=8"]
    with pytest.raises(ConfigError, match="above the dense model's predicted latency") as err:
        run_experiment(tmp_path / "above", [*static, *fake_clock, "pruner.target_ms=1e9"])
    dense = _dense_ms(str(err.value))
    assert "\n" not in str(err.value) and dense > 0
    _, summary = run_experiment(tmp_path / "ms", [*static, *fake_clock, f"pruner.target_ms={0.6 * dense}"])
    (lat,) = summary["expert_latency_ratios"]
    assert 0.55 <= lat <= 0.6 + 1e-9, lat


def test_aptp_target_in_milliseconds_runs(tmp_path, fake_clock):
    overrides = ["router.num_experts=2", "pruner.steps=4", "pruner.warmup_steps=2", "pruner.batch_size=4",
                 "pruner.log_every=1", "pruner.checkpoint_every=1000", "pruner.phase2.steps=0",
                 "pruner.data.num_samples=8"]
    with pytest.raises(ConfigError, match="above the dense model's predicted latency") as err:
        run_experiment(tmp_path / "above", [*overrides, *fake_clock, "pruner.target_ms=1e9"])
    target = 0.5 * _dense_ms(str(err.value))
    composition, summary = run_experiment(tmp_path / "ms", [*overrides, *fake_clock, f"pruner.target_ms={target}"])
    assert composition.pruner.config.target_ratio == pytest.approx(0.5, rel=1e-3)  # what the resource loss used
    assert len(summary["expert_latency_ratios"]) == 2


@pytest.mark.parametrize("pruner", ["aptp", "static"])
def test_target_ms_needs_resource_latency(tmp_path, pruner):
    base = [] if pruner == "aptp" else ["pruner=static", "router=single", "assignment=magnitude"]
    with pytest.raises(ConfigError, match="target_ms=12.0 needs resource: latency") as err:
        run_experiment(tmp_path, [*base, "pruner.target_ms=12.0"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="target_ms=-1.0 must be > 0"):
        run_experiment(tmp_path, [*base, "pruner.resource=latency", "pruner.target_ms=-1.0"])


def test_static_latency_with_aligned_units_and_minimum_widths(tmp_path, fake_clock):
    """Hardware-aligned units and minimum kept widths through the config, pruned to a latency target:
    the saved expert records them and loads back to the unit space's parameter count."""
    import json

    from aptp.core.resources import count_params
    from aptp.core.units import UnitSpace
    from aptp.pruners.expert import load_expert

    gran = ("granularity=[{name: resnet_channels, channels_per_unit: 16, min_kept_channels: 16}, "
            "{name: attention_heads, min_kept_heads: 2}, "
            "{name: ffn, channels_per_unit: 16, min_kept_channels: 32}, {name: depth}]")
    static = ["pruner=static", "router=single", "assignment=magnitude", "pruner.finetune.steps=0",
              "pruner.data.num_samples=8", "pruner.target_ratio=0.5", gran]
    _, summary = run_experiment(tmp_path / "run", [*static, *fake_clock])
    (lat,) = summary["expert_latency_ratios"]
    assert 0.45 <= lat <= 0.5 + 1e-9, lat
    (folder,) = (tmp_path / "run" / "experts").iterdir()
    meta = json.loads((folder / "aptp_expert.json").read_text())
    space = UnitSpace.from_dict(meta["unit_space"])
    assert {g.min_kept for g in space.groups if g.kind == "attention_heads"} == {2}
    assert {g.min_kept for g in space.groups if g.kind == "ffn"} == {2}
    expert = load_expert(folder)
    assert count_params(expert) == int(round(meta["kept_params"]))
