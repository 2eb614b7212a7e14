"""``gradkit diagnose``: per-layer cosine between a gradient estimate and backprop on one batch."""

from __future__ import annotations

import argparse
import json

from gradkit.cli._parser import _non_negative_int, add_training_args, config_from_args
from gradkit.diagnose import diagnose
from gradkit.errors import ConfigError

HELP = "per-layer cosine between a method's gradient estimate (or low-bit activations) and backprop"
DESCRIPTION = """\
Build the model, take the first training batch, and compare the method's gradient estimate with the
true backprop gradient layer by layer (cosine similarity and norm ratio), as in Fig. 7 of the ULR paper.
With --activations MODE (int8, int4, int2, blpa...), compare backprop under MODE with exact backprop
instead (cosine and relative error per layer).

A check at initialisation can pass where a trained model fails (int2 on a GPT: median cosine 0.997 at
initialisation, 0.57 after 300 steps when attention is not kept at 8 bits), so check at trained weights:
--weights RUN_DIR (a finished `gradkit train` run of the same --model/--data, or its model.pt), or
--train-steps N (N steps of exact backprop with --optimizer/--lr first, on the batches after the
checked one).

example:
  gradkit diagnose --method ulr --model mlp --data fashion-mnist --json
  gradkit diagnose --method ulr --model mlp --data fashion-mnist -o copies=16 -o baseline=none
  gradkit diagnose --activations int2 --model gpt --data text --batch-size 32 --optimizer adam \\
      --lr 1e-3 --train-steps 300
  gradkit diagnose --activations int2 --attention-bits off --model gpt --data text --weights runs/gpt
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("diagnose", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="average the cosines over N independent estimates (default: 1)")
    p.add_argument("--weights", metavar="RUN_DIR|MODEL_PT",
                   help="check at trained weights: a finished run's folder (same --model and --data) or "
                        "its model.pt (default: the freshly initialised model)")
    p.add_argument("--train-steps", type=_non_negative_int, default=0, metavar="N",
                   help="first train N steps of exact backprop (--optimizer, --lr; constant rate) on the "
                        "batches after the checked one, then check (default: 0, at initialisation)")
    add_training_args(p, workers=False)
    p.set_defaults(run=run, method=None)
    for action in p._actions:
        if action.dest == "method":
            action.default = None
            action.help = ("method whose estimate is checked (default: ulr; with a low-bit --activations, "
                           "bp under that mode)")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be a positive integer, got {args.repeats}")
    if args.method is None:
        args.method = "bp" if args.activations != "exact" else "ulr"
    result = diagnose(config_from_args(args, progress=False), repeats=args.repeats, weights=args.weights,
                      train_steps=args.train_steps)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    at = (f", weights {result['weights']}" if result["weights"] else "") + (
        f", after {result['train_steps']} training steps" if result["train_steps"] else ", at initialisation")
    if result["check"] == "activations":
        print(f"bp under --activations {result['activations']} (attention {result['attention_bits']}) vs exact, "
              f"{result['model']} / {result['data']}, batch {result['batch_size']}{at}")
        print(f"{'layer':<28} {'cosine':>7} {'rel error':>9}")
        for row in result["layers"]:
            print(f"{row['name']:<28} {row['cosine']:>7.3f} {row['rel_error']:>9.3f}")
        print(f"median cosine {result['median_cosine']:.3f}, min {result['min_cosine']:.3f} "
              f"({result['worst_layer']})")
        return 0
    print(f"{result['method']} on {result['model']} / {result['data']}, batch {result['batch_size']}{at}")
    print(f"{'layer':<28} {'params':>9} {'cosine':>7} {'|est|/|bp|':>10}")
    for row in result["layers"]:
        print(f"{row['name']:<28} {row['params']:>9} {row['cosine']:>7.3f} {row['relative_norm']:>10.3f}")
    return 0
