"""The procedures share one engine (issue 16, item 2): one loss assembly, one fine-tuning loop, one
gradient sum, no procedure importing another, assignments independent of the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import aptp

PRUNERS = Path(aptp.__file__).parent / "pruners"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _calls(path: Path, name: str) -> int:
    return sum(1 for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == name
                                                   or getattr(node.func, "id", None) == name))


def test_assignments_do_not_import_the_engine_and_static_does_not_import_aptp():
    for path in (PRUNERS / "assignments").glob("*.py"):
        assert not any(m.startswith("aptp.pruners.training") for m in _imports(path)), path.name
    assert not any(m.startswith("aptp.pruners.aptp") for m in _imports(PRUNERS / "static.py"))


def test_one_loss_assembly_one_gradient_sum_one_finetuning_loop():
    files = [p for p in PRUNERS.glob("*.py")] + list((PRUNERS / "assignments").glob("*.py"))
    where = {name: sorted(p.name for p in files if _calls(p, name)) for name in
             ("task_losses", "all_reduce", "finetune_expert", "OTRouter")}
    assert where["task_losses"] == ["training.py"], where  # TrainContext.task_loss
    assert where["all_reduce"] == ["distributed.py"], where  # sum_gradients
    assert where["finetune_expert"] == ["finetune.py", "training.py"], where  # the loop, and the context's shortcut
    assert where["OTRouter"] == [], where  # routers are built through the registry
