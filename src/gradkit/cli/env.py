"""``gradkit env``: versions and hardware, to paste into bug reports."""

from __future__ import annotations

import argparse
import json

from gradkit.envinfo import collect, format_env

HELP = "print versions and hardware (for bug reports)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("env", help=HELP, description=HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0
