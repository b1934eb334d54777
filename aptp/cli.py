"""The ``aptp`` command line: ``aptp list | config | run | compare | ablate | route | analyze``
(``aptp COMMAND --help``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

#: Sub-commands implemented in their own modules: each has ``add_parser(subparsers)``, which adds the
#: sub-command with ``func`` set to the module's ``main(args) -> int``.
EXTERNAL_COMMANDS = ("aptp.routers.cli_route", "aptp.analysis_cli")


def _cmd_list(args: argparse.Namespace) -> int:
    from aptp.core.plugins import default_registry
    from aptp.core.registry import KINDS

    registry = default_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        specs = list(registry[kind])
        print(f"{kind} ({len(specs)})")
        if not specs:
            print("  (none registered)")
        for spec in specs:
            provider = spec.distribution or spec.provider
            print(f"  {spec.name:<20} {provider:<22} {spec.summary}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from aptp.core.config import load_experiment

    cfg = load_experiment(args.experiment, args.overrides, search_path=args.config_dir or ())
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from aptp.core.build import build
    from aptp.core.config import load_experiment
    from aptp.core.rundir import open_run

    cfg = load_experiment(args.experiment, args.overrides, search_path=args.config_dir or ())
    composition = build(cfg)
    pruner = composition.require("pruner")
    output_dir = Path(args.output_dir or cfg.output_dir)
    # The folder's lock for the whole run; a folder holding results of another config is refused
    # before anything in it is written, unless --restart discards them.
    with open_run(output_dir, cfg, composition.registry, restart=args.restart):
        summary = pruner.run(composition, output_dir)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from aptp.core.config import check_name
    from aptp.harness import compare, load_comparison

    cfg = load_comparison(args.comparison, args.overrides)
    for cell in cfg.cells:
        check_name(cell, f"{args.comparison}: cell name")
    out = Path(args.output_dir or cfg.output_dir)
    result = compare(cfg.base, cfg.cells, cfg.eval, out, seeds=cfg.seeds, grid=cfg.grid_spec(),
                     reuse_evaluations=args.reuse_evaluations)
    print(f"report: {result['report']}")
    if "ablation" in result:
        print(f"ablation: {result['ablation']}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from aptp.core.config import check_name
    from aptp.core.errors import ConfigError
    from aptp.harness import EvalConfig, compare, grid_spec, parse_grid

    shared: dict[str, list[str]] = {}
    for item in args.shared or []:
        cond, sep, dropped = item.partition(":")
        if not sep or "=" not in cond or not dropped:
            raise ConfigError(f"--shared {item!r} must look like AXIS=VALUE:OTHER_AXIS[,...] "
                              "(e.g. router.num_experts=1:router).")
        shared[cond] = dropped.split(",")
    spec = grid_spec(parse_grid(args.grid), shared)
    for cell in spec["cells"]:
        check_name(cell, "grid cell name (from --grid values)")
    try:
        eval_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig),
                                                       OmegaConf.from_dotlist(args.eval or [])))
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"--eval {' '.join(args.eval or [])}: {exc}") from None
    name = check_name(args.name or f"{Path(args.experiment).stem}-ablation", "--name")
    out = Path(args.output_dir or f"runs/{name}")
    cells = {cell: list(args.set or []) + [f"{k}={v}" for k, v in values.items()]
             for cell, values in spec["cells"].items()}
    result = compare(args.experiment, cells, eval_cfg, out, grid=spec, reuse_evaluations=args.reuse_evaluations)
    print(f"report: {result['report']}")
    print(f"ablation: {result['ablation']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aptp",
        description="Prompt-routed pruning of text-to-image diffusion models (APTP) and static baselines. "
        "Components (backbones, granularities, routers, ...) come from plugins; experiments are YAML "
        "files composing them by name.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list registered components by kind, with the distribution providing each",
                       description="List every registered component, grouped by kind, with the plugin "
                       "distribution that provides it. Block a plugin with APTP_BLOCK_PLUGINS=name.")
    from aptp.core.registry import KINDS

    p.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND", help=f"only this kind ({', '.join(KINDS)})")
    p.set_defaults(func=_cmd_list)

    overrides_help = ("overrides: SLOT=PRESET picks another preset (router=kmeans), DOTTED.KEY=VALUE sets a "
                      "value (router.num_experts=4)")
    for name, func, text in (
        ("config", _cmd_config, "print the resolved config of an experiment"),
        ("run", _cmd_run, "run an experiment: build its components and run its pruner"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". EXPERIMENT is a "
                           "YAML path or a name under configs/experiment/.")
        p.add_argument("experiment", metavar="EXPERIMENT")
        p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=overrides_help)
        p.add_argument("--config-dir", action="append", metavar="DIR",
                       help="extra folder of presets (<kind>/<preset>.yaml), searched first; repeatable")
        if name == "run":
            p.add_argument("--output-dir", metavar="DIR", help="where to write results (default: the "
                           "experiment's output_dir, runs/<name>)")
            p.add_argument("--restart", action="store_true",
                           help="delete the results already in the output folder (experts, checkpoints, logs) "
                           "and run from the beginning. Without it, a folder whose results came from the same "
                           "config is resumed, and one whose results came from another config is refused "
                           "(its fingerprint.json differs) with nothing written")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "compare", help="run compositions and compare them with the dense model on the same prompts",
        description="Run every composition (cell) of a comparison file (configs/comparison/NAME.yaml), once per "
        "training seed in its `seeds`, skipping cells that finished before from the same config (a changed "
        "cell is refused). Then every model generates the same held-out prompts (stratified by kind) from the "
        "same initial noise under each of eval.sample_seeds, with a deterministic sampler, and the command "
        "writes report.md (means with 95% bootstrap intervals, paired differences against eval.reference and "
        "eval.pairs with a verdict only where the interval excludes zero, deployed kept MACs, interleaved "
        "latency, routing by kind, image grids), results.json and per_prompt.jsonl (one row per model, prompt, "
        "sampling seed and training seed).")
    p.add_argument("comparison", metavar="COMPARISON", help="a YAML path or a name under configs/comparison/")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="eval.KEY=VALUE (e.g. eval.prompts_per_kind=16, eval.sample_seeds=[0,1]), seeds=[0,1] "
                   "(training seeds), or CELL.KEY=VALUE for one cell "
                   "(e.g. aptp.pruner.steps=50)")
    p.add_argument("--output-dir", metavar="DIR", help="default: the comparison's output_dir (runs/<name>)")
    p.add_argument("--reuse-evaluations", action="store_true",
                   help="reuse a cell's evaluation (quality figures and per-prompt rows) from the output folder's "
                   "previous results.json and per_prompt.jsonl instead of generating its images again, when the eval "
                   "config is the same apart from the latency and reporting settings (pairs, reference, intervals, budget), the cell's summary is unchanged (not "
                   "retrained), and dense, always evaluated again, reproduces its previous per-prompt rows exactly "
                   "(else every cell is evaluated again). Latency is always measured again for every model; reused "
                   "cells get no image grids and are listed in results.json ('reused') and report.md")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "ablate", help="run a grid of overrides of one experiment and compare every cell",
        description="Expand --grid into every combination of overrides (e.g. router=ot,kmeans "
        "router.num_experts=1,4), run each cell (resumable: finished cells are skipped; a cell folder from "
        "another config is refused), evaluate all with the paired protocol and write report.md plus "
        "ablation.md: per cell quality with its interval, paired differences against each axis' first value "
        "(e.g. K=1 of the same granularity), pooled effects per axis, and figures of quality against the "
        "numeric axis and of significant wins. With static baselines, write a comparison file with grid: and "
        "cells: (see configs/comparison/ablation.yaml) and run `aptp compare` on it.")
    p.add_argument("experiment", metavar="EXPERIMENT")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="axes of the grid; each KEY is a slot (preset choice) or a dotted key")
    p.add_argument("--shared", nargs="*", metavar="AXIS=VALUE:AXES",
                   help="axes that do not matter in cells with AXIS=VALUE: those cells run once (e.g. "
                   "router.num_experts=1:router -- one K=1 cell, not one per router)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides applied to every cell first")
    p.add_argument("--eval", nargs="*", metavar="KEY=VALUE", help="evaluation settings (prompts_per_kind=16 sample_seeds=[0,1] steps=10 ...; see aptp.harness.EvalConfig)")
    p.add_argument("--name", help="name of the ablation (default: EXPERIMENT-ablation)")
    p.add_argument("--output-dir", metavar="DIR", help="default: runs/<name>")
    p.add_argument("--reuse-evaluations", action="store_true",
                   help="as in `aptp compare`: reuse an unchanged cell's previous evaluation when dense reproduces "
                   "its previous per-prompt rows exactly (cells added to a grid are then the only ones generated)")
    p.set_defaults(func=_cmd_ablate)

    for module in _external_modules():
        module.add_parser(sub)  # adds its sub-command with func=module.main
    return parser


def _external_modules() -> list:
    modules = []
    for module_name in EXTERNAL_COMMANDS:
        try:
            modules.append(importlib.import_module(module_name))
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
    return modules


def _version() -> str:
    from aptp import __version__

    return __version__


#: Set to 1 to see the traceback of an error the CLI reports in one line.
DEBUG_ENV = "APTP_DEBUG"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command. A user-caused error (aptp's own errors, a missing file, an unreadable
    or unwritable path, a malformed value) ends in one line ``aptp COMMAND: error: ...`` and exit
    code 2, with no traceback unless ``APTP_DEBUG=1``; anything else (a bug) propagates."""
    import os
    import traceback

    from aptp.core.errors import AptpError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # positionals given after a flag (`aptp run smoke --output-dir X key=v`, `aptp route DIR --json "a
    # prompt"`): argparse leaves them over; they belong to the sub-command's positional list
    trailing = next((name for name in ("overrides", "prompts") if isinstance(getattr(args, name, None), list)), None)
    if extra and (trailing is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, trailing, getattr(args, trailing) + extra)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (AptpError, FileNotFoundError) as exc:
        if debug:
            traceback.print_exc()
        print(f"aptp {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        # last line of defence: I/O and format errors the loaders did not wrap. Shown as the
        # exception type and message; APTP_DEBUG=1 shows where it came from.
        if debug:
            traceback.print_exc()
        print(f"aptp {args.command}: error: {type(exc).__name__}: {_one_line(exc)} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aptp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
