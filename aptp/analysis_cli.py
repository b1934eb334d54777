"""``aptp analyze ROUTER_DIR PROMPTS``: what the experts of a router stand for (see aptp.analysis).

Wired into ``aptp`` through ``aptp.cli.EXTERNAL_COMMANDS`` (``add_parser(subparsers)`` +
``main(args)``); also runnable alone: ``python -m aptp.analysis_cli ROUTER_DIR PROMPTS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from aptp.core.errors import AptpError

DESCRIPTION = """Route a prompt file with a saved router bundle and report what the experts stand for.

Writes to --out (default ROUTER_DIR/analysis):
  analysis.md                       the report (tables + figures)
  analysis.json                     the numbers
  expert_load.png                   prompts per expert, with each expert's kept-MACs ratio
  labels_per_expert_<COL>.png       heatmap: the labels of each expert's prompts
  kept_macs_per_label_<COL>.png     mean kept-MACs ratio of each label's prompts, sorted
  embedding_map.png                 2-D map (PCA or t-SNE) of the prompt embeddings, coloured by expert

For each label column it measures how strongly experts and labels go together: NMI (normalised
mutual information; 1 = experts are exactly the labels, 0 = independent or one expert), AMI (the
same corrected for chance) and ARI (adjusted Rand index); and, with kept MACs, the mean kept-MACs
ratio per label and the share of the variance of the prompts' kept MACs the label explains (eta²).
For each expert it lists the words that distinguish its prompts from the others (weighted log-odds,
Monroe et al. 2008) and example prompts. Kept MACs need a bundle saved with its unit space and
architectures; otherwise they are reported as unavailable. Works for every router kind (ot, kmeans,
nearest, single).

PROMPTS is one prompt per line, or a TSV/CSV with a 'Prompt' column; its other columns are labels
(PartiPrompts.tsv: Category, Challenge, Note)."""

EPILOG = """examples:
  aptp analyze runs/demo/router PartiPrompts.tsv --label-columns Category,Challenge
  aptp analyze runs/demo/router prompts.txt --out /tmp/analysis --map tsne --examples 5
  aptp analyze runs/demo/router big.tsv --max-prompts 5000"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command to ``subparsers``; sets ``func=main`` as its default."""
    p = subparsers.add_parser("analyze", help="report what a router's experts stand for on a prompt file",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("router_dir", metavar="ROUTER_DIR", help="router bundle folder (written by save_router_bundle)")
    p.add_argument("prompts", metavar="PROMPTS", help="prompt file: one per line, or TSV/CSV with a Prompt column")
    p.add_argument("--label-columns", metavar="COL,COL", default=None,
                   help="label columns to analyse, comma-separated, any case (default: every column that "
                        "is not free text: at most 50 distinct values and one per two prompts; '' for none)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: ROUTER_DIR/analysis)")
    p.add_argument("--max-prompts", type=int, metavar="N", default=None,
                   help="analyse a random sample of N prompts (seeded, file order kept)")
    p.add_argument("--map", choices=("pca", "tsne"), default="pca",
                   help="2-D map of the embeddings: pca (default, fast) or tsne (slower, local structure)")
    p.add_argument("--examples", type=int, metavar="N", default=3, help="example prompts per expert (default 3)")
    p.add_argument("--top-words", type=int, metavar="N", default=8,
                   help="distinguishing words per expert (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of --max-prompts sampling and t-SNE (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while encoding")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m aptp.analysis_cli``)."""
    p = argparse.ArgumentParser(prog="aptp analyze", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def _columns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [c.strip() for c in text.split(",") if c.strip()]


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run ``aptp analyze``; returns the exit status (0 ok, 2 bad input)."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    from aptp.analysis import analyze, write_report

    try:
        result = analyze(args.router_dir, args.prompts, label_columns=_columns(args.label_columns),
                         max_prompts=args.max_prompts, top_words=args.top_words, examples=args.examples,
                         map_method=args.map, seed=args.seed, progress=False if args.no_progress else None)
        out_dir = Path(args.out) if args.out else Path(args.router_dir) / "analysis"
        report = write_report(result, out_dir)
    except (AptpError, FileNotFoundError) as exc:
        print(f"aptp analyze: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{result.router} router, K={result.num_experts}, {result.num_prompts} prompts")
    if result.mean_kept is not None:
        print(f"mean kept-MACs ratio: {result.mean_kept:.3f}")
    for col, la in result.labels.items():
        eta = "" if la.kept_eta2 is None else f"  kept-MACs variance explained (eta²) {la.kept_eta2:.3f}"
        print(f"{col}: NMI {la.nmi:.3f}  AMI {la.ami:.3f}  ARI {la.ari:.3f}{eta}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
