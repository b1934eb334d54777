import json

import pytest

from aptp.cli import main
from aptp.core.errors import ConfigError
from aptp.harness import grid_cells, load_comparison


def test_grid_cells_are_the_cartesian_product():
    cells = grid_cells(["router=ot,kmeans", "router.num_experts=1,4"])
    assert list(cells) == ["router=ot,router.num_experts=1", "router=ot,router.num_experts=4",
                           "router=kmeans,router.num_experts=1", "router=kmeans,router.num_experts=4"]
    assert cells["router=kmeans,router.num_experts=4"] == ["router=kmeans", "router.num_experts=4"]
    with pytest.raises(ValueError, match="must look like key=v1,v2"):
        grid_cells(["router"])


def test_comparison_overrides_reach_eval_and_single_cells():
    cfg = load_comparison("smoke", ["eval.num_prompts=3", "static.pruner.finetune.steps=1"])
    assert cfg.eval.num_prompts == 3
    assert cfg.cells["static"][-1] == "pruner.finetune.steps=1" and "pruner.finetune.steps=1" not in cfg.cells["aptp"]
    with pytest.raises(ConfigError, match="num_promts"):
        load_comparison("smoke", ["eval.num_promts=3"])


@pytest.mark.slow
def test_compare_writes_a_report_with_every_model(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "smoke", "eval.latency_batch_sizes=[2]", "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    for model in ("| dense |", "| aptp |", "| static |"):
        assert model in report
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "aptp", "static"]
    static = rows[2]
    assert 0.5 <= static["mean_macs_ratio"] <= 0.6 and sum(static["load"]) == 12  # 4 prompts x 3 kinds
    for name in ("tradeoffs.png", "aptp_expert_macs.png", "static_expert0.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    # a second run reuses the finished cells
    (out / "report.md").unlink()
    assert main(["compare", "smoke", "eval.latency_batch_sizes=[2]", "--output-dir", str(out)]) == 0
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_ablate_runs_a_grid_of_routers_and_granularities(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "smoke", "--grid", "router=ot,kmeans,nearest", "granularity=width,depth",
            "--set", "backbone.resolution=16", "pruner.progress=false",
            "--eval", "prompts_per_kind=2", "sample_seeds=[0]", "steps=2", "metrics=[]", "latency_batch_sizes=[2]",
            "latency_rounds=1", "latency_repeats=1",
            "grid_per_expert=2", "--output-dir", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "router=ot,granularity=width", "router=ot,granularity=depth",
                                          "router=kmeans,granularity=width", "router=kmeans,granularity=depth",
                                          "router=nearest,granularity=width", "router=nearest,granularity=depth"]
    assert (out / "figures" / "tradeoffs.png").stat().st_size > 1000
    def outputs():  # what a rerun of a cell would rewrite: its summary and its experts
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cells").rglob("*")
                if p.name == "summary.json" or p.suffix == ".safetensors"}

    finished = outputs()
    assert len(finished) >= 12
    assert main(args) == 0  # resumable: finished cells are not run again
    assert outputs() == finished


def test_compare_from_python_refuses_a_cell_name_that_escapes_its_folder(tmp_path):
    from aptp.core.errors import ConfigError
    from aptp.harness import EvalConfig, compare

    with pytest.raises(ConfigError, match="is not a name"):
        compare("smoke", {"../escaped": []}, EvalConfig(), tmp_path / "cmp")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cmp").exists()


def test_the_deterministic_sampler_keeps_a_flow_matching_scheduler():
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from aptp.core.interfaces import BackboneModules
    from aptp.harness import deterministic_modules

    flow = BackboneModules(denoiser=None, scheduler=FlowMatchEulerDiscreteScheduler())
    assert deterministic_modules(flow, "ddim").scheduler is flow.scheduler  # Euler flow sampling: deterministic
    ddpm = BackboneModules(denoiser=None, scheduler=DDPMScheduler(num_train_timesteps=100))
    ddim = deterministic_modules(ddpm, "ddim").scheduler
    assert isinstance(ddim, DDIMScheduler) and ddim.config.num_train_timesteps == 100
