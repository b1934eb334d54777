"""The paper's recipe where the original differs from what was here before (issue 15): one task-loss
function for both phases (block distillation averaged over blocks), the contrastive loss on the
group-normalised hard gates, the router's lr x sqrt(global batch), the phase-2 checkpoint interval
from the config, the codes' kept-MACs ratios in the phase-1 log, argmax rounding end to end."""

import inspect
import math

import torch

from aptp.core.checkpoint import list_checkpoints, load_checkpoint
from aptp.pruners import objectives as O
import aptp.pruners.aptp as aptp_module

from runs import read_log, run_experiment


def test_fidelity_to_the_paper_in_one_small_run(tmp_path, monkeypatch):
    callers, archs = [], []
    task_losses, contrastive = O.task_losses, aptp_module.contrastive_loss

    def task_spy(*args, **kw):
        stack = inspect.stack()
        assert stack[1].function == "task_loss"  # the one assembly, TrainContext.task_loss ...
        callers.append(stack[2].function)  # ... called by each procedure's step
        return task_losses(*args, **kw)

    def contrastive_spy(a, z, **kw):
        archs.append(a.detach().clone())
        return contrastive(a, z, **kw)

    monkeypatch.setattr(O, "task_losses", task_spy)
    monkeypatch.setattr(aptp_module, "contrastive_loss", contrastive_spy)
    comp, summary = run_experiment(tmp_path, [
        "pruner.steps=3", "pruner.warmup_steps=1", "pruner.checkpoint_every=1", "pruner.lr=0.01",
        "pruner.scale_lr=true", "pruner.phase2.steps=4", "pruner.phase2.checkpoint_every=2",
        "pruner.phase2.lr=0.001", "balancer.rounding=argmax"])

    # one loss assembly, used by phase 1 (3 steps) and by phase 2 (4 steps for each of 2 experts)
    assert callers.count("phase1") == 3 and callers.count("finetune_expert") == 8, callers

    # the contrastive loss sees hard gates weighted by 1/sqrt(group size), not raw logits
    w = comp.router.layout.group_weight  # (U,)
    assert len(archs) == 3
    for a in archs:
        assert a.shape == (4, w.numel())
        assert bool((torch.isclose(a, torch.zeros(())) | torch.isclose(a, w.expand_as(a))).all())
        assert bool((a > 0).any())

    # router lr x sqrt(global batch 4); phase-2 lr x sqrt(its batch 4)
    _, state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints" / "phase1")[-1])
    assert math.isclose(state["opt"]["param_groups"][0]["lr"], 0.01 * math.sqrt(4))
    for k in range(2):
        found = list_checkpoints(tmp_path / "checkpoints" / f"expert-{k}")
        assert [p.name for p in found] == ["step-00000002", "step-00000004"], found  # every 2, not 100
        _, state = load_checkpoint(found[-1])
        assert math.isclose(state["opt"]["param_groups"][0]["lr"], 0.001 * math.sqrt(4))

    # every phase-1 log record carries the codes' kept-MACs ratios; argmax rounding routes every row
    log = read_log(tmp_path / "phase1.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(len(r["code_ratios"]) == 2 and all(0 < x <= 1 for x in r["code_ratios"]) for r in log)
    assert all(sum(r["load"]) == 4 for r in log if not r["warmup"])
