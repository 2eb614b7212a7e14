"""Argument parsing shared by the subcommands: one-line errors and the training options."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from gradkit.compress import ATTENTION_BITS, MAX_GROUP_SIZE
from gradkit.config import ACTIVATION_MODES, BALANCES, MAX_THREADS, PRECISIONS, TrainConfig
from gradkit.data import DATASETS
from gradkit.errors import ConfigError
from gradkit.methods import METHODS, check_options
from gradkit.models import MODELS
from gradkit.optim import LR_SCHEDULES, OPTIMIZERS

__all__ = [
    "Parser",
    "add_model_data_args",
    "add_training_args",
    "check_model_data",
    "config_from_args",
    "group_size",
    "thread_count",
]

_DEFAULTS = TrainConfig()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def thread_count(text: str) -> int:
    """``--threads``: 1 to ``MAX_THREADS`` (see gradkit.config)."""
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS} threads, got {value}; use about this "
                                         f"machine's core count")
    return value


def group_size(text: str) -> int:
    """A quantisation group size: a multiple of 8 from 8 to the kernels' ``MAX_GROUP_SIZE``."""
    value = _positive_int(text)
    if value % 8 or value > MAX_GROUP_SIZE:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 from 8 to {MAX_GROUP_SIZE}, got {value}; "
                                         f"use e.g. 256 (default) or {MAX_GROUP_SIZE}")
    return value


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in text.split(",") if m.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 150,225, got {text!r}") from None


def _option_value(text: str) -> object:
    """``true``/``false``, an int, a float, or the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _stages(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _block_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block counts like 4,7, got {text!r}") from None


def _method_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like bn_policy=replay, got {text!r}")
    return key, _option_value(value)


def add_training_args(parser: argparse.ArgumentParser, *, single_method: bool = True,
                      workers: bool | None = None) -> None:
    """The options of ``gradkit train`` (``compare`` shares all but --method/--out/--resume)."""
    what = parser.add_argument_group("what to train")
    if single_method:
        what.add_argument("--method", default="bp", choices=METHODS.names(), help="training method (default: bp)")
    add_model_data_args(what, model=str(_DEFAULTS.model), data=str(_DEFAULTS.data))
    what.add_argument("--data-dir", metavar="DIR",
                      help="folder searched first for dataset files (default: $GRADKIT_DATA, then standard places)")
    what.add_argument("--download", action="store_true", help="fetch the dataset from its official source if missing")
    what.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on a stratified subset of N samples")
    what.add_argument("--limit-test", type=_positive_int, metavar="N", help="test on a stratified subset of N samples")
    what.add_argument("--stages", type=_stages, default=1, metavar="K",
                      help="split the model into K pipeline stages (default: 1); with train, 'auto' "
                           "picks K <= --workers and the split from profiled block costs and prints the "
                           "predicted speed-up")
    what.add_argument("--balance", default=_DEFAULTS.balance, choices=BALANCES,
                      help="how stages are balanced (default: %(default)s)")
    what.add_argument("--stage-sizes", type=_block_counts, metavar="N1,N2,...",
                      help="blocks per stage, e.g. 4,7 (overrides --balance; one number per stage)")
    what.add_argument("-o", "--option", dest="method_options", type=_method_option, action="append",
                      default=[], metavar="KEY=VALUE",
                      help="a method-specific option, repeatable (e.g. -o bn_policy=reference); "
                           "an unknown key is an error that lists the method's options")

    how = parser.add_argument_group("how to train")
    how.add_argument("--epochs", type=_positive_int, default=_DEFAULTS.epochs, help="default: %(default)s")
    how.add_argument("--batch-size", type=_positive_int, default=_DEFAULTS.batch_size, help="default: %(default)s")
    how.add_argument("--optimizer", default=_DEFAULTS.optimizer, choices=OPTIMIZERS, help="default: %(default)s")
    how.add_argument("--lr", type=float, help="learning rate (default: 0.05 for sgd, 0.001 for adam)")
    how.add_argument("--momentum", type=float, default=_DEFAULTS.momentum, help="SGD momentum (default: %(default)s)")
    how.add_argument("--no-nesterov", action="store_true", help="plain instead of Nesterov momentum")
    how.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay, help="default: %(default)s")
    how.add_argument("--lr-schedule", "--schedule", dest="lr_schedule", default=_DEFAULTS.lr_schedule,
                     choices=LR_SCHEDULES, help="learning-rate schedule (default: %(default)s; "
                                                "--schedule is its old name)")
    how.add_argument("--milestones", type=_milestones, default=(), metavar="E1,E2",
                     help="epochs where multistep divides the rate by 10 (default: 50%%,75%% of --epochs)")
    how.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="default: %(default)s")
    how.add_argument("--activations", default=_DEFAULTS.activations, choices=ACTIVATION_MODES,
                     help="activations kept for backward: exact, blpa8/blpa4 (BN->ReLU->Conv codes, "
                          "Chakrabarti & Moseley 2019), int8/int4/int2 (any model), naive8 "
                          "(quantised forward too); combinable with every method (default: %(default)s)")
    how.add_argument("--activation-group-size", type=group_size, default=_DEFAULTS.activation_group_size,
                     metavar="N", help="elements per quantisation range for the int modes and the "
                                       "generic part of blpa (multiple of 8, at most "
                                       f"{MAX_GROUP_SIZE}; default: %(default)s)")
    how.add_argument("--attention-bits", default=_DEFAULTS.attention_bits, choices=ATTENTION_BITS,
                     help="width of attention's saved tensors (scaled_dot_product_attention, "
                          "nn.MultiheadAttention, softmax, and the attention output) under a low-bit "
                          "--activations: auto (8 under int2, where 2-bit attention breaks once "
                          "trained; else the mode's), off (the mode's width), exact, or at least 2/4/8 "
                          "(default: %(default)s)")
    how.add_argument("--precision", default=_DEFAULTS.precision, choices=PRECISIONS,
                     help="fp32, or bf16: torch.autocast with bfloat16 around every step (fp32 weights, "
                          "optimizer state and loss; default: %(default)s)")
    how.add_argument("--measure-direction", type=_positive_int, metavar="N",
                     help="every N steps also compute the true backprop gradient and log sigma = <grad f, g>/|grad f|^2 "
                          "and the cosine of the method's update g (per-epoch mean and min in metrics.jsonl)")

    where = parser.add_argument_group("where to run")
    where.add_argument("--threads", type=thread_count, metavar="N",
                       help="CPU threads for torch (with --workers, per worker; default: cores / workers)")
    if single_method if workers is None else workers:  # compare and diagnose run in this process
        where.add_argument("--workers", type=_positive_int, metavar="K",
                           help="run the K stages in K processes on this machine, one stage each (fr, ddg, "
                                "dni, bp); under torchrun the ranks are the workers and this may be left out")
    where.add_argument("--device", type=_device, default=_DEFAULTS.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    where.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_model_data_args(group: argparse._ActionsContainer, *, model: str, data: str) -> None:
    """``--model``/``--data`` (a registered name or ``package.module:function``) and their options."""
    group.add_argument("--model", default=model, metavar="NAME|MODULE:FACTORY",
                       help=f"model: {', '.join(MODELS.names())}, or your own factory as package.module:function "
                            "(see README, 'Your own model') (default: %(default)s)")
    group.add_argument("--model-option", dest="model_options", type=_method_option, action="append",
                       default=[], metavar="KEY=VALUE",
                       help="a model option, repeatable (e.g. --model-option layers=2 for gpt)")
    group.add_argument("--data", default=data, metavar="NAME|MODULE:FUNCTION",
                       help=f"dataset: {', '.join(DATASETS.names())}, or your own function as "
                            "package.module:function (default: %(default)s)")
    group.add_argument("--data-option", dest="data_options", type=_method_option, action="append",
                       default=[], metavar="KEY=VALUE",
                       help="a dataset option, repeatable (e.g. --data-option context=32 for text)")


def check_model_data(model: str, data: str) -> None:
    """Fail now, in one line, on an unknown name or an import path that leads nowhere."""
    MODELS.get(model)
    DATASETS.get(data)


def config_from_args(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from parsed options."""
    fields = dict(
        method=getattr(args, "method", "bp"),
        model=args.model,
        model_options=dict(getattr(args, "model_options", None) or []),
        data=args.data,
        data_options=dict(getattr(args, "data_options", None) or []),
        out=getattr(args, "out", None),
        data_dir=args.data_dir,
        download=args.download,
        stages=args.stages,
        balance=args.balance,
        stage_sizes=getattr(args, "stage_sizes", None) or None,
        method_options=dict(getattr(args, "method_options", None) or []),
        activations=getattr(args, "activations", "exact"),
        activation_group_size=getattr(args, "activation_group_size", _DEFAULTS.activation_group_size),
        attention_bits=getattr(args, "attention_bits", _DEFAULTS.attention_bits),
        precision=getattr(args, "precision", _DEFAULTS.precision),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        milestones=args.milestones,
        seed=args.seed,
        threads=args.threads,
        workers=getattr(args, "workers", None),
        device=args.device,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        resume=getattr(args, "resume", False),
        progress=not args.no_progress,
        measure_direction=getattr(args, "measure_direction", None),
    )
    fields.update(overrides)
    check_model_data(str(fields["model"]), str(fields["data"]))
    if fields["stages"] == "auto":
        raise ConfigError("--stages auto is for gradkit train only; give a number of stages here")
    config = TrainConfig(**fields)  # type: ignore[arg-type]
    if "method" in vars(args):  # compare checks each method's share of the options itself
        workers = config.workers or 1
        check_options(config.method, config.method_options, stage_parallel=workers > 1)
    return config


def _device(text: str) -> str:
    """``--device``: cpu, cuda, cuda:N, auto or another torch device type, checked at parse time."""
    name = text.strip()
    if name == "auto":
        return name
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    return name
