"""``gradkit schedule``: print a pipeline schedule as a grid of steps x stages."""

from __future__ import annotations

import argparse

from gradkit.cli._parser import _non_negative_int, _positive_int
from gradkit.methods import method_options, stage_parallel_class, stage_parallel_names

HELP = "print which stage does what at each step (fr, ddg, dni, or the synchronous bp pipeline)"
DESCRIPTION = """\
Print the order of actions of a K-stage pipeline, one row per step and one column per stage: the
same schedule object the executor runs. "play"/"forward" send a batch up, "replay"/"backward"
send its error gradient down, "update" is the optimizer step, "loss" is the last stage's forward
and backward, "synthetic" updates with a DNI synthesizer's prediction and "fit" trains it.

example:
  gradkit schedule --method fr --stages 3 --steps 6
  gradkit schedule --method fr --stages 3 --steps 8 --last-batch 4    # the drain after batch 4
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("schedule", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=stage_parallel_names(), default="fr",
                   help="a pipelined method; bp shows its synchronous pipeline (default: %(default)s)")
    p.add_argument("--stages", type=_positive_int, default=3, metavar="K", help="default: %(default)s")
    p.add_argument("--steps", type=_positive_int, default=6, help="rows to print (default: %(default)s)")
    p.add_argument("--last-batch", type=_non_negative_int, metavar="B", help="show the pipeline draining after batch B")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=0, metavar="W",
                   help="dni only: steps that wait for true gradients (default: 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cls = stage_parallel_class(args.method)
    assert cls is not None  # argparse allowed only the pipelined methods
    options = {"warmup_steps": args.warmup_steps} if "warmup_steps" in method_options(args.method) else {}
    schedule = cls.schedule_for(args.stages, **options)
    print(schedule.grid(args.steps, last_batch=args.last_batch))
    return 0
