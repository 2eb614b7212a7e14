"""``gradkit diagnose``: per-layer cosine between a gradient estimate and backprop on one batch."""

from __future__ import annotations

import argparse
import json

from gradkit.cli._parser import add_training_args, config_from_args
from gradkit.diagnose import diagnose

HELP = "per-layer cosine between a method's gradient estimate and backprop (one batch)"
DESCRIPTION = """\
Build the model, take the first training batch, and compare the method's gradient estimate with the
true backprop gradient layer by layer (cosine similarity and norm ratio), as in Fig. 7 of the ULR paper.

example:
  gradkit diagnose --method ulr --model mlp --data fashion-mnist --json
  gradkit diagnose --method ulr --model mlp --data fashion-mnist -o copies=16 -o baseline=none
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("diagnose", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="average the cosines over N independent estimates (default: 1)")
    add_training_args(p, workers=False)
    p.set_defaults(run=run, method="ulr")
    for action in p._actions:
        if action.dest == "method":
            action.default = "ulr"
            action.help = "method whose estimate is checked (default: ulr)"


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        from gradkit.errors import ConfigError

        raise ConfigError(f"--repeats must be a positive integer, got {args.repeats}")
    result = diagnose(config_from_args(args, progress=False), repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['method']} on {result['model']} / {result['data']}, batch {result['batch_size']}")
    print(f"{'layer':<28} {'params':>9} {'cosine':>7} {'|est|/|bp|':>10}")
    for row in result["layers"]:
        print(f"{row['name']:<28} {row['params']:>9} {row['cosine']:>7.3f} {row['relative_norm']:>10.3f}")
    return 0
