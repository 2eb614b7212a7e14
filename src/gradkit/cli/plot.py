"""``gradkit plot``: loss curves of run folders."""

from __future__ import annotations

import argparse

from gradkit.plot import plot_runs

HELP = "plot loss against epochs and wall-clock time for run folders"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help=HELP, description=HELP + " (like Fig. 4 of the Features Replay paper)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by gradkit train --out")
    p.add_argument("-o", "--output", default="loss.png", metavar="PNG", help="image to write (default: %(default)s)")
    p.add_argument("--title", help="figure title (default: model and dataset of the first run)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = plot_runs(args.runs, args.output, title=args.title)
    print(f"plot: {path}")
    return 0
