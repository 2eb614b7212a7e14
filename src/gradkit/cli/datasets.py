"""``gradkit datasets``: where each dataset was found, or how to get it."""

from __future__ import annotations

import argparse

from gradkit.data import describe_datasets

HELP = "list datasets, where each was found or how to get it"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("datasets", help=HELP, description=HELP)
    p.add_argument("--data-dir", metavar="DIR", help="folder searched first (default: $GRADKIT_DATA)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    statuses = describe_datasets(args.data_dir)
    width = max(len(s.name) for s in statuses)
    for status in statuses:
        if status.found is not None:
            print(f"{status.name:<{width}}  found: {status.found}")
        else:
            print(f"{status.name:<{width}}  missing: {status.hint}")
    print("searched, in order: " + ", ".join(str(p) for p in statuses[0].searched))
    return 0
