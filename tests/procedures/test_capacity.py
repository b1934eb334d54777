"""Capacity-aware code budgets (pruner.code_budget=sensitivity, issue 15): the allocation's maths,
a deterministic measurement, a smoke run that logs the per-code targets and resumes them, and the
paper's default left bit-identical."""

from __future__ import annotations

import math

import pytest
import torch

from aptp.cli import main
from aptp.pruners.capacity import allocate_targets, code_resource_loss, fit_exponential, measure_sensitivity

from runs import read_log, run_experiment

TINY = ["backbone.resolution=16", "pruner.progress=false"]
RATIOS = torch.tensor([0.45, 0.6, 0.75], dtype=torch.float64)


def curve(a: float, b: float) -> torch.Tensor:
    return a * torch.exp(-b * RATIOS)  # (3,)


# ------------------------------------------------------------------------------------ allocation
def test_allocation_meets_the_load_weighted_budget_inside_the_box():
    errors = torch.stack([curve(1.0, 6.0), curve(0.2, 2.0), curve(3.0, 9.0), curve(0.5, 4.0)])  # (4, 3)
    for loads in ([10, 10, 10, 10], [1, 7, 3, 20], [5, 0, 9, 1]):
        n = torch.tensor(loads, dtype=torch.float64)
        for target, spread in ((0.6, 0.15), (0.3, 0.25), (0.9, 0.15)):
            p = allocate_targets(errors, RATIOS, n, target, spread)
            assert p.shape == (4,)
            assert math.isclose(float((n * p).sum()), target * float(n.sum()), rel_tol=0, abs_tol=1e-12)
            lo, hi = max(target - spread, 1e-3), min(target + spread, 1.0)
            assert bool(((p >= lo - 1e-12) & (p <= hi + 1e-12)).all()), (p, lo, hi)
    # a code without load stays at the target and does not enter the budget
    p = allocate_targets(errors, RATIOS, torch.tensor([5.0, 0.0, 9.0, 1.0]), 0.6, 0.15)
    assert float(p[1]) == 0.6


def test_the_more_sensitive_code_gets_the_larger_target_and_equal_curves_equal_targets():
    loads = torch.tensor([4.0, 4.0])
    # code 0's prompts suffer more from pruning at every budget (1.5x the error, the same decay):
    # equal marginal gains at p_0 - p_1 = log(1.5) / 4
    p = allocate_targets(torch.stack([curve(1.5, 4.0), curve(1.0, 4.0)]), RATIOS, loads, 0.6, 0.15)
    assert p[0] > 0.6 > p[1] and math.isclose(float(p[0] - p[1]), math.log(1.5) / 4, rel_tol=1e-9)
    # ... and a steeper curve with the larger error over the box wins as well
    p = allocate_targets(torch.stack([curve(3.0, 6.0), curve(0.2, 3.0)]), RATIOS, loads, 0.6, 0.15)
    assert p[0] > 0.6 > p[1]
    p = allocate_targets(torch.stack([curve(1.0, 5.0), curve(1.0, 5.0), curve(1.0, 5.0)]), RATIOS,
                         torch.tensor([3.0, 1.0, 7.0]), 0.6, 0.15)
    assert torch.allclose(p, torch.full((3,), 0.6, dtype=torch.float64), atol=1e-12)
    # stationarity inside the box: equal marginal gains a_k b_k exp(-b_k p_k)
    errors = torch.stack([curve(1.0, 6.0), curve(0.8, 5.0)])
    p = allocate_targets(errors, RATIOS, loads, 0.6, 0.15)
    a, b = fit_exponential(errors, RATIOS)
    gains = a * b * torch.exp(-b * p)
    assert bool(((p > 0.45) & (p < 0.75)).all()) and math.isclose(float(gains[0]), float(gains[1]), rel_tol=1e-9)
    # a flat or rising curve (b clamped to its floor) gets the smallest share: the box's lower end
    rising = torch.stack([curve(1.0, 6.0), curve(0.1, -2.0)])
    assert torch.allclose(allocate_targets(rising, RATIOS, loads, 0.6, 0.15),
                          torch.tensor([0.75, 0.45], dtype=torch.float64), atol=1e-9)
    # no spread: every code at the target
    assert torch.equal(allocate_targets(errors, RATIOS, loads, 0.6, 0.0), torch.full((2,), 0.6, dtype=torch.float64))


def test_fit_recovers_an_exponential_and_ignores_zero_errors():
    a, b = fit_exponential(torch.stack([curve(0.7, 4.0), torch.tensor([0.05, 0.02, 0.0], dtype=torch.float64)]), RATIOS)
    assert math.isclose(float(a[0]), 0.7, rel_tol=1e-9) and math.isclose(float(b[0]), 4.0, rel_tol=1e-9)
    assert math.isclose(float(b[1]), math.log(0.05 / 0.02) / 0.15, rel_tol=1e-9)  # the zero (dense) point dropped


def test_code_resource_loss_is_load_weighted_and_skips_empty_codes():
    r = torch.tensor([0.5, 0.7, 0.6, 0.6], requires_grad=True)
    ids = torch.tensor([0, 0, 2, 2])
    p = torch.tensor([0.6, 0.5, 0.5])
    loss = code_resource_loss(r, ids, p)
    expected = 0.5 * abs(math.log(0.6 / 0.6)) + 0.5 * abs(math.log(0.6 / 0.5))
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-6)
    loss.backward()
    assert bool(torch.isfinite(r.grad).all())


# ----------------------------------------------------------------------------------- measurement
def test_measure_sensitivity_is_deterministic_on_the_smoke_backbone(tmp_path):
    from aptp.core.build import build
    from aptp.core.config import load_experiment
    from aptp.pruners.training import TrainContext

    cfg = load_experiment("smoke", TINY)
    composition = build(cfg)
    ctx = TrainContext(composition, composition.pruner.config.data, tmp_path, progress=False)
    groups = [torch.tensor([0, 3, 5, 6, 9]), torch.tensor([1, 2, 4])]
    torch.manual_seed(123)
    errors, measured = measure_sensitivity(ctx, groups, [0.45, 0.6, 0.75], batch_size=2)
    state = torch.get_rng_state()
    again, measured_again = measure_sensitivity(ctx, groups, [0.45, 0.6, 0.75], batch_size=2)
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone
    assert errors.shape == (2, 3) and torch.equal(errors, again) and torch.equal(measured, measured_again)
    assert bool(torch.isfinite(errors).all() and (errors > 0).all())
    assert bool((measured <= torch.tensor([0.45, 0.6, 0.75], dtype=torch.float64) + 1e-9).all())
    assert bool((measured[1:] >= measured[:-1]).all())
    empty, _ = measure_sensitivity(ctx, [torch.tensor([0]), torch.tensor([], dtype=torch.long)], [0.6], batch_size=2)
    assert bool(torch.isnan(empty[1]).all()) and bool(torch.isfinite(empty[0]).all())


# -------------------------------------------------------------------------------------- phase 1
COMMON = ["router.num_experts=2", "pruner.warmup_steps=2", "pruner.batch_size=4", "pruner.lr=0.1",
          "pruner.scale_lr=false", "pruner.checkpoint_every=100", "pruner.phase2.steps=0",
          "pruner.data.num_samples=16", "pruner.steps=5", "pruner.init_codes=kmeans"]


def test_smoke_run_with_sensitivity_budgets_logs_code_targets(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "smoke", *TINY, *COMMON, "pruner.code_budget=sensitivity", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "code_targets:" in printed
    log = read_log(out / "phase1.jsonl")
    assert [r["code_targets"] for r in log if r["warmup"]] == [None, None]
    trained = [r for r in log if not r["warmup"]]
    targets = trained[0]["code_targets"]
    assert len(targets) == 2 and all(r["code_targets"] == targets for r in trained)
    assert all(abs(t - 0.6) <= 0.15 + 1e-6 for t in targets)
    assert all(r["code_resource"] is not None for r in trained)


def test_the_default_is_the_paper_and_the_measurement_leaves_training_alone(tmp_path):
    run_experiment(tmp_path / "default", COMMON)
    run_experiment(tmp_path / "uniform", COMMON + ["pruner.code_budget=uniform"])
    _, summary = run_experiment(tmp_path / "sens", COMMON + ["pruner.code_budget=sensitivity"])
    default = (tmp_path / "default" / "phase1.jsonl").read_text()
    assert default == (tmp_path / "uniform" / "phase1.jsonl").read_text()  # bit-identical log
    assert "code_targets" not in default and "code_resource" not in default
    base, sens = read_log(tmp_path / "default" / "phase1.jsonl"), read_log(tmp_path / "sens" / "phase1.jsonl")
    # warm-up identical; at the measurement step the task losses too (same data, noise, gates)
    for a, b in zip(base, sens):
        if a["warmup"]:
            assert a == {k: v for k, v in b.items() if k not in ("code_targets", "code_resource")}
    first = next(i for i, r in enumerate(base) if not r["warmup"])
    for key in ("denoise", "distill", "block", "resource", "contrastive", "mean_ratio", "load", "code_ratios"):
        assert base[first][key] == sens[first][key], key
    loads = summary["code_sensitivity"]["loads"]
    assert sum(loads) == 16 and len(summary["code_targets"]) == 2
    mean = sum(n * p for n, p in zip(loads, summary["code_targets"])) / sum(loads)
    assert abs(mean - 0.6) < 1e-3  # the load-weighted budget (targets rounded to 4 digits in the summary)


def test_resume_after_the_measurement_keeps_the_measured_targets(tmp_path, monkeypatch):
    import aptp.pruners.aptp as aptp_module

    common = COMMON + ["pruner.code_budget=sensitivity", "pruner.checkpoint_every=1"]
    run_experiment(tmp_path / "full", common)

    class Killed(Exception):
        pass

    save = aptp_module.save_checkpoint

    def save_then_die(directory, step, state, **kw):
        save(directory, step, state, **kw)
        if step == 4:
            raise Killed

    calls = []
    measure = aptp_module.AptpPruner._code_budgets
    monkeypatch.setattr(aptp_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_experiment(tmp_path / "cut", common)
    monkeypatch.undo()
    monkeypatch.setattr(aptp_module.AptpPruner, "_code_budgets", lambda *a, **kw: calls.append(1) or measure(*a, **kw))
    run_experiment(tmp_path / "cut", common)
    assert calls == []  # resumed at step 4: the targets come from the checkpoint, not a new measurement
    full, cut = read_log(tmp_path / "full" / "phase1.jsonl"), read_log(tmp_path / "cut" / "phase1.jsonl")
    assert [r["step"] for r in cut] == list(range(5))
    assert [r["code_targets"] for r in full] == [r["code_targets"] for r in cut]


def test_fixed_router_takes_sensitivity_budgets(tmp_path):
    _, summary = run_experiment(tmp_path, ["router=kmeans", *COMMON[1:], "pruner.code_budget=sensitivity"])
    assert len(summary["code_targets"]) == 2 and sum(summary["code_sensitivity"]["loads"]) == 16


def test_a_bad_code_budget_is_a_one_line_error(capsys):
    assert main(["run", "smoke", *TINY, "pruner.code_budget=large"]) == 2
    err = capsys.readouterr().err
    assert "code_budget='large' is unknown" in err and err.count("\n") == 1, err
    assert main(["run", "smoke", *TINY, "pruner.code_budget_spread=1.5"]) == 2
    assert "code_budget_spread=1.5" in capsys.readouterr().err
