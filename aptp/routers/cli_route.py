"""``aptp route ROUTER_DIR "prompt" ... [--file PROMPTS]``: which expert takes each prompt.

The CLI owner wires this in with ``add_parser(subparsers)``; ``main(args)`` runs it. Also runnable
alone: ``python -m aptp.routers.cli_route ROUTER_DIR "a prompt"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aptp.core.errors import AptpError, ConfigError

DESCRIPTION = """Route prompts with a saved router bundle and print, for each prompt, the expert
it goes to and that expert's kept-MACs ratio (kept MACs / dense MACs; '-' when the bundle has no
architectures). Prompts come from the command line and/or --file (one prompt per line, or a
TSV/CSV with a 'Prompt' column such as PartiPrompts.tsv)."""

EPILOG = """examples:
  aptp route runs/demo/router "a red cube on a table" "a photo of a cat"
  aptp route runs/demo/router --file PartiPrompts.tsv --summary
  aptp route runs/demo/router --file prompts.txt --json > routes.jsonl"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``route`` sub-command to ``subparsers``; sets ``func=main`` as its default."""
    p = subparsers.add_parser("route", help="route prompts to experts with a saved router bundle",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("router_dir", metavar="ROUTER_DIR", help="router bundle folder (written by save_router_bundle)")
    p.add_argument("prompts", metavar="PROMPT", nargs="*", help="prompts to route (quote each one)")
    p.add_argument("-f", "--file", action="append", default=[], metavar="PROMPTS",
                   help="prompt file: one per line, or TSV/CSV with a Prompt column (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of a table")
    p.add_argument("--summary", action="store_true", help="print only the load and kept-MACs ratio per expert")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while encoding many prompts")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m aptp.routers.cli_route``)."""
    p = argparse.ArgumentParser(prog="aptp route", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run ``aptp route``; returns the exit status (0 ok, 2 bad input)."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    from aptp.data.prompts import read_prompts
    from aptp.routers.bundle import load_router_bundle, route_prompts

    try:
        prompts = list(args.prompts)
        for path in args.file:
            prompts += read_prompts(path)
        if not prompts:
            raise ConfigError("no prompts: pass prompts as arguments or --file PROMPTS (see aptp route --help).")
        bundle = load_router_bundle(args.router_dir)
        res = route_prompts(bundle, prompts, progress=False if args.no_progress else None)
    except (AptpError, FileNotFoundError) as exc:
        print(f"aptp route: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    ratios = res.kept_ratios.tolist() if res.kept_ratios is not None else [None] * res.num_experts
    load = res.load.tolist()
    out = sys.stdout
    if args.json:
        for i, (p, k) in enumerate(zip(res.prompts, res.expert_ids.tolist())):
            out.write(json.dumps({"index": i, "expert": k, "kept_macs_ratio": ratios[k], "prompt": p}) + "\n")
        return 0
    if not args.summary:
        out.write(f"{'#':>5}  {'expert':>6}  {'kept':>6}  prompt\n")
        for i, (p, k) in enumerate(zip(res.prompts, res.expert_ids.tolist())):
            out.write(f"{i:>5}  {k:>6}  {_fmt_ratio(ratios[k]):>6}  {p}\n")
        out.write("\n")
    out.write(f"{'expert':>6}  {'prompts':>7}  {'kept':>6}\n")
    for k in range(res.num_experts):
        out.write(f"{k:>6}  {load[k]:>7}  {_fmt_ratio(ratios[k]):>6}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
