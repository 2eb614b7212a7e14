"""``gradkit memory``: bytes saved for backward by one training step, exact and compressed."""

from __future__ import annotations

import argparse
import json

import torch

from gradkit.cli._parser import add_model_data_args, check_model_data
from gradkit.compress import MODES, measure_activations
from gradkit.data import BatchLoader, load_dataset
from gradkit.errors import ConfigError
from gradkit.models import build_model
from gradkit.runs import format_bytes, format_table

HELP = "activation memory of one training step under each --activations mode"
DESCRIPTION = """\
Run one forward+backward of MODEL on one batch of DATA and report the bytes autograd keeps for the
backward pass: exact_bytes (plain training), stored_bytes (under --activations) and their ratio.
Parameters are not counted; a tensor saved by several operations counts once; the input batch counts
in both. Without --json, a per-tensor table follows (one mode) or a table of modes (several).

example:
  gradkit memory --model resnet20 --data cifar10 --batch-size 128 --activations int4 --json
  gradkit memory --model cnn --data fashion-mnist --activations exact,int8,int4,int2,naive8
"""


def _modes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode {', '.join(unknown) or text!r}; choose from: {', '.join(MODES)}")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("memory", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(p, model="resnet20", data="cifar10")
    p.add_argument("--data-dir", metavar="DIR", help="folder searched first for dataset files")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--activations", type=_modes, default=["int4"], metavar="MODE[,MODE...]",
                   help=f"one or more of {', '.join(MODES)} (default: int4)")
    p.add_argument("--group-size", type=int, default=256, help="elements per quantisation range (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several modes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    check_model_data(args.model, args.data)
    dataset = load_dataset(args.data, args.data_dir, limit_train=args.batch_size, limit_test=1, seed=args.seed,
                           options=dict(args.data_options))
    info = dataset.info
    loader = BatchLoader(dataset.train_x, dataset.train_y, info, args.batch_size, train=True, seed=args.seed)
    x, y = next(iter(loader.epoch(0)))
    torch.manual_seed(args.seed)
    model = build_model(args.model, info.input_shape, info.num_classes,
                        **{**dataset.model_args, **dict(args.model_options)})
    options = {"group_size": args.group_size} if args.group_size != 256 else {}
    exact_bytes = measure_activations(model, x, y, "exact").exact_bytes  # once, shared by all modes
    results = [measure_activations(model, x, y, mode, exact_bytes=exact_bytes,
                                   **(options if mode != "exact" else {}))
               for mode in args.activations]
    if args.json:
        payload = [dict(r.to_dict(), model=args.model, data=args.data, batch_size=int(y.numel()))
                   for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return 0
    print(f"{args.model} on {args.data}, batch {y.numel()}: bytes saved for backward by one step")
    if len(results) == 1:
        r = results[0]
        table = [(rec.module or "-", "x".join(map(str, rec.shape)), str(rec.dtype).replace("torch.", ""),
                 rec.kind, format_bytes(rec.exact_bytes), format_bytes(rec.stored_bytes))
                for rec in r.records]
        print(format_table(("module", "shape", "dtype", "kept as", "exact", "stored"), table))
    summary = [(r.mode, format_bytes(r.exact_bytes), format_bytes(r.stored_bytes), f"{r.ratio:.2f}x")
            for r in results]
    print(format_table(("activations", "exact_bytes", "stored_bytes", "ratio"), summary))
    return 0
