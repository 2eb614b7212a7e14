"""``gradkit train``: one run of one method."""

from __future__ import annotations

import argparse
import os

from gradkit._fileio import check_writable_folder
from gradkit.cli._parser import add_training_args, config_from_args
from gradkit.run_folder import RunFolder
from gradkit.runs import format_bytes
from gradkit.training import train

HELP = "train a model with one method"
DESCRIPTION = """\
Train a model with one method and write the run folder --out: config.json, metrics.jsonl (one JSON
object per epoch), checkpoint.pt (replaced atomically every epoch and on Ctrl-C or SIGTERM; with
--workers, checkpoint.json and one shard per worker under checkpoint/) and model.pt.

example:
  gradkit train --method bp --model cnn --data fashion-mnist --epochs 3 --out runs/cnn
  gradkit train --method bp --model cnn --data fashion-mnist --epochs 3 --out runs/cnn --resume

  gradkit train --method fr --stages 2 --workers 2 --model resnet20 --data cifar10 --out runs/fr2
  torchrun --nproc-per-node 2 -m gradkit train --method fr --stages 2 --model resnet20 --data cifar10 --out runs/fr2

--stages auto --workers 4 profiles the model's blocks and picks K <= 4 and the split with the best
predicted speed-up over single-process backprop (printed before training starts).

--workers K runs each of the K stages in its own process (fr, ddg, dni, and bp as the synchronous
pipeline), with cores / K threads each unless --threads says otherwise; under torchrun each rank is
one stage. See README "Stage-parallel training" for several machines.

--resume continues an interrupted run from its checkpoint (same options; only --epochs, --threads,
--device and the optimizer settings --lr, --momentum, --nesterov, --weight-decay, --lr-schedule,
--milestones and --warmup-steps may change; changed settings are recorded) and ends with the same weights as an
uninterrupted run. A larger --epochs
extends a finished run, but with the cosine or default multistep schedule the learning rate then
follows the new length.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add_training_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable_folder(args.out)  # before any data loads: a bad --out is reported at once
    if args.stages == "auto":
        from gradkit.stages.auto import resolve_auto_stages

        saved = RunFolder(args.out).read_config() if args.resume else None
        config = resolve_auto_stages(config_from_args(args, stages=1), args.workers, saved)
    else:
        config = config_from_args(args)
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # one rank of a torchrun run: rank 0 reports
        return 0
    final = result.final
    # A language model reports its per-token loss and bits per character instead of accuracy.
    score = (f"test_loss {final['test_loss']:.4f}, test_bpc {final['test_bpc']:.4f}" if "test_bpc" in final
             else f"test_acc {final['test_acc']:.4f}, test_loss {final['test_loss']:.4f}")
    print(
        f"{config.method} {config.model} on {config.data}: {score}, "
        f"{final['samples_per_second']:.0f} samples/s, "
        f"activations {format_bytes(final.get('activation_bytes'))} per step"
    )
    print(f"run folder: {config.out}")
    return 0
