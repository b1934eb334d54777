"""The registry is passed down, never fetched from a global in library code: ``default_registry()``
is called only to fill a ``registry=None`` default of the function that takes it (the public entry
points), or by the command line."""

import ast
from pathlib import Path
from types import SimpleNamespace

import aptp
from aptp.core.interfaces import AssignmentContext, TrainingView

PACKAGE = Path(aptp.__file__).resolve().parent
COMMAND_LINE = {"cli.py"}


def test_default_registry_only_fills_a_registry_parameter():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in COMMAND_LINE:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "default_registry"]
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            if calls and "registry" not in params:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{fn.name}")
    assert not offenders, f"default_registry() called where no registry is passed in: {offenders}"


def test_run_folder_helpers_use_the_registry_they_are_given():
    from aptp.core.config import load_experiment
    from aptp.core.plugins import load_registry
    from aptp.core.rundir import component_versions, fingerprint

    registry = load_registry()
    cfg = load_experiment("smoke", registry=registry)
    assert component_versions(cfg, registry)["aptp"] == aptp.__version__
    assert fingerprint(cfg, registry)["sha256"] == fingerprint(cfg)["sha256"]


def test_analysis_names_an_unnamed_router_from_the_given_registry():
    from aptp.analysis import _router_name

    class Mine:
        pass

    bundle = SimpleNamespace(info={}, router=Mine())
    registry = {"router": [SimpleNamespace(name="mine", factory=Mine)]}
    assert _router_name(bundle, registry) == "mine"
    assert _router_name(bundle, {"router": []}) == "Mine"


def test_train_context_is_a_training_view(tmp_path):
    """The pruners' TrainContext provides what assignments read (AssignmentContext.train_context)."""
    from aptp.core.build import build
    from aptp.core.config import load_experiment
    from aptp.pruners.training import TrainContext

    composition = build(load_experiment("smoke", ["pruner=static", "router=single", "assignment=magnitude",
                                                   "pruner.data.num_samples=2"]))
    ctx = TrainContext(composition, composition.pruner.config.data, tmp_path, progress=False)
    assert isinstance(ctx, TrainingView)
    AssignmentContext(ctx.unit_space, 1, 0.5, train_context=ctx)
