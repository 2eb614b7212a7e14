"""``gradkit evaluate``: accuracy of a finished run under an input attack (FGSM, PGD, Gaussian noise)."""

from __future__ import annotations

import argparse
import json

import torch

from gradkit.checkpoint import load_checkpoint
from gradkit.cli._parser import _positive_int
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.errors import ConfigError, DataError
from gradkit.models import build_model
from gradkit.robustness import ATTACKS, attacked_accuracy
from gradkit.run_folder import CONFIG, RunFolder

HELP = "test accuracy of a trained run under FGSM, PGD or Gaussian input perturbations"
DESCRIPTION = """\
Load RUN_DIR (config.json and model.pt of a finished `gradkit train`), then measure test accuracy clean
and under an attack of size --eps (in [0, 1] pixel units, L-infinity for fgsm/pgd, the noise std for
gaussian).

example:
  gradkit evaluate --attack fgsm --eps 0.03 runs/ulr
  gradkit evaluate --attack pgd --eps 0.03 --steps 10 --limit-test 1000 runs/bp --json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run")
    p.add_argument("--attack", required=True, choices=ATTACKS, help="fgsm, pgd or gaussian")
    p.add_argument("--eps", type=float, required=True, help="perturbation size in [0, 1] pixel units")
    p.add_argument("--steps", type=_positive_int, default=10, help="PGD steps (default: %(default)s)")
    p.add_argument("--limit-test", type=_positive_int, metavar="N", help="evaluate on a stratified subset of N test images")
    p.add_argument("--data-dir", metavar="DIR", help="folder searched first for the dataset")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = RunFolder(args.run_dir)
    run_dir = folder.path
    saved = folder.read_config()
    if saved is None:
        raise ConfigError(f"{run_dir} has no {CONFIG}; give the folder of a `gradkit train` run")
    try:
        config = TrainConfig.from_dict(saved)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{folder.config_path} is not a gradkit run configuration ({_first_line(exc)}); "
                        "give the folder of a `gradkit train` run") from None
    weights = folder.model_path
    if not weights.is_file():
        raise ConfigError(f"{run_dir} has no model.pt (the run did not finish); finish it with --resume")
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    dataset = load_dataset(config.data, args.data_dir or config.data_dir,
                           limit_test=args.limit_test or config.limit_test, seed=config.seed,
                           options=config.data_options)
    model = build_model(config.model, dataset.info.input_shape, dataset.info.num_classes,
                        **{**dataset.model_args, **config.model_options})
    try:
        model.load_state_dict(load_checkpoint(weights))
    except (RuntimeError, KeyError, TypeError) as exc:
        raise DataError(f"{weights} does not hold weights of {config.model} on {config.data} "
                        f"({_first_line(exc)}); give the run folder that wrote it") from None
    loader = BatchLoader(dataset.test_x, dataset.test_y, dataset.info, 500, train=False)
    torch.manual_seed(0)
    clean, attacked = attacked_accuracy(model, loader, args.attack, args.eps, steps=args.steps)
    result = {"run": str(run_dir), "method": config.method, "model": config.model, "data": config.data,
              "attack": args.attack, "eps": args.eps, "clean_acc": clean, "attacked_acc": attacked}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{config.method} {config.model} on {config.data}: clean {clean:.4f}, "
              f"{args.attack} eps={args.eps}: {attacked:.4f}")
    return 0


def _first_line(exc: BaseException) -> str:
    """The telling line of ``exc`` (for load_state_dict: the first missing key or size mismatch)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if ln.startswith(("Missing", "Unexpected", "size mismatch"))]
    line = (detail or lines or [type(exc).__name__])[0].rstrip(":.")
    return line if len(line) <= 160 else line[:157] + "..."
