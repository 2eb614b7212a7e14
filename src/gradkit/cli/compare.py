"""``gradkit compare``: every registered method side by side."""

from __future__ import annotations

import argparse
import sys

from gradkit._fileio import check_writable_folder
from gradkit.cli._parser import add_training_args, config_from_args
from gradkit.compare import DEFAULT_METHODS, compare, format_comparison
from gradkit.data import DATASETS, describe_datasets
from gradkit.methods import METHODS

HELP = "train several methods side by side; print a table and plot their losses"
DESCRIPTION = """\
Train several methods on the same model, data, seed and budget, then print a table (method, test
accuracy, epoch time, activation memory) and write OUT/compare.png: loss against epochs and against
wall-clock time. Each method's run folder is OUT/<method>.

example:
  gradkit compare --model cnn --data fashion-mnist --fallback-data digits --epochs 3 --out runs/demo
"""


def _method_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return names
    unknown = [n for n in names if n.partition(":")[0] not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or text!r}; choose from: {', '.join(METHODS.names())}"
        )
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=_method_list, metavar="M1,M2",
                   help=f"methods to compare, each optionally METHOD:K with its own stage count "
                        f"(e.g. bp,fr:2,ddg:2), or 'all' (default: {', '.join(n for n in DEFAULT_METHODS if n in METHODS)}; "
                        f"registered: {', '.join(METHODS.names())})")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="parent of the run folders (default: %(default)s)")
    p.add_argument("--fallback-data", choices=DATASETS.names(), metavar="NAME",
                   help="dataset to use instead when --data is not found anywhere (the demo uses digits)")
    add_training_args(p, single_method=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable_folder(args.out)  # before any data loads
    if args.fallback_data and args.fallback_data != args.data and not args.download:
        status = {s.name: s for s in describe_datasets(args.data_dir)}.get(args.data)
        if status is not None and status.found is None:
            print(f"{args.data} was not found (see `gradkit datasets`); using {args.fallback_data} instead",
                  file=sys.stderr)
            args.data = args.fallback_data
    config = config_from_args(args)
    rows, plot_path = compare(config, args.methods, out=args.out)
    data = str(config.data) + (f" ({config.limit_train} train samples)" if config.limit_train else "")
    print(f"\n{config.model} on {data}, {config.epochs} epochs, batch {config.batch_size}, seed {config.seed}")
    print(format_comparison(rows))
    if plot_path is not None:
        print(f"\nplot: {plot_path}")
    return 0
