import pytest

from aptp.core.errors import ConfigError

from runs import read_log, run_experiment

STATIC = ["pruner=static", "router=single", "assignment=random", "pruner.finetune.steps=25",
          "pruner.finetune.batch_size=4", "pruner.finetune.lr=1e-3", "pruner.finetune.denoise=0",
          "pruner.finetune.distill=1", "pruner.scale_lr=false",
          "pruner.data.num_samples=8"]


def test_static_cut_meets_budget_and_finetuning_lowers_distillation(tmp_path):
    comp, summary = run_experiment(tmp_path, STATIC)
    (ratio,) = summary["expert_macs_ratios"]
    assert 0.5 <= ratio <= 0.6, ratio  # the largest random architecture within the 0.6 budget
    before, after = summary["phase2_distill_before_after"][0]
    assert before > 0 and after < 0.7 * before, (before, after)
    log = read_log(tmp_path / "phase2.jsonl")
    assert [r["step"] for r in log] == list(range(25))


def test_kmeans_router_with_per_cluster_taylor(tmp_path):
    _, summary = run_experiment(tmp_path, ["pruner=static", "router=kmeans", "router.num_experts=2",
                                           "assignment=taylor", "assignment.calibration_batches=1",
                                           "assignment.batch_size=4", "pruner.finetune.steps=1",
                                           "pruner.finetune.batch_size=2", "pruner.data.num_samples=12"])
    assert len(summary["expert_macs_ratios"]) == 2 and sum(summary["routed_load"]) == 12
    assert all(r <= 0.6 + 1e-6 for r in summary["expert_macs_ratios"])


def test_static_pruner_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="needs an 'assignment'"):
        run_experiment(tmp_path, ["pruner=static", "router=single"])
