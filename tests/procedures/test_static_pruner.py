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


def test_torch_pruning_backend_trains_and_saves_the_same_expert(tmp_path):
    """The channel baseline cut by torch-pruning's dependency graph: same expert, same fine-tuning."""
    import torch

    from aptp.pruners.expert import load_expert

    common = ["pruner=static", "router=single", "assignment=magnitude", "granularity=width",
              "pruner.finetune.steps=3", "pruner.finetune.batch_size=2", "pruner.data.num_samples=4"]
    _, ours = run_experiment(tmp_path / "aptp", common)
    _, theirs = run_experiment(tmp_path / "tp", [*common, "pruner.cut_backend=torch_pruning"])
    assert theirs["expert_macs_ratios"] == ours["expert_macs_ratios"]
    a = load_expert(tmp_path / "aptp" / "experts" / "expert-0").state_dict()
    b = load_expert(tmp_path / "tp" / "experts" / "expert-0").state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_unknown_cut_backend_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cut_backend='pruna'.*torch_pruning"):
        run_experiment(tmp_path, ["pruner=static", "router=single", "assignment=magnitude",
                                  "pruner.cut_backend=pruna"])


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp", "fpgm"])
def test_torch_pruning_importance_meets_the_budget(tmp_path, importance):
    _, summary = run_experiment(tmp_path, ["pruner=static", "router=kmeans", "router.num_experts=2",
                                           "assignment=depgraph", f"assignment.importance={importance}",
                                           "assignment.calibration_batches=1", "assignment.batch_size=4",
                                           "pruner.finetune.steps=0", "pruner.data.num_samples=8"])
    ratios = summary["expert_macs_ratios"]
    assert len(ratios) == 2 and all(0.5 <= r <= 0.6 + 1e-6 for r in ratios), ratios
