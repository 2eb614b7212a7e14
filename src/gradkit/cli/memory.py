"""``gradkit memory``: bytes saved for backward by one training step, exact and compressed."""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from torch import nn

from gradkit.cli._parser import add_model_data_args, check_model_data, group_size, thread_count
from gradkit.compress import ATTENTION_BITS, MAX_GROUP_SIZE, MODES, Activations, measure_activations
from gradkit.data import BatchLoader, load_dataset
from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy
from gradkit.memory import CudaMemoryStats, largest_batch, step_peak_bytes
from gradkit.models import build_model
from gradkit.precision import PRECISIONS, Precision
from gradkit.runs import format_bytes, format_table

HELP = "activation memory of one training step under each --activations mode"
DESCRIPTION = """\
Run one forward+backward of MODEL on one batch of DATA and report the bytes autograd keeps for the
backward pass: exact_bytes (plain training), stored_bytes (under --activations) and their ratio.
Parameters are not counted; a tensor saved by several operations counts once; the input batch counts
in both. Without --json, a per-tensor table follows (one mode) or a table of modes (several).

With --precision bf16 the step runs under bf16 autocast, so exact_bytes are bf16 activations (2 bytes
an element) and ratios are against them. With --device cuda the step's measured peak is reported too
(torch.cuda.max_memory_allocated during the step less what was allocated before it: the model and the
batch). --max-batch (CUDA only) finds, per mode, the largest batch whose step fits in --budget-mb (or
in the GPU) by doubling then bisection, on the first --batch-size training examples of DATA repeated to each
size tried (the BLPA paper's Table 2).

example:
  gradkit memory --model resnet20 --data cifar10 --batch-size 128 --activations int4 --json
  gradkit memory --model cnn --data fashion-mnist --activations exact,int8,int4,int2,naive8
  gradkit memory --model resnet56 --device cuda --precision bf16 --activations exact,int4 --max-batch --budget-mb 4096
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
    p.add_argument("--group-size", type=group_size, default=256,
                   help=f"elements per quantisation range (multiple of 8, at most {MAX_GROUP_SIZE}; default: 256)")
    p.add_argument("--attention-bits", default="auto", choices=ATTENTION_BITS,
                   help="width of attention's saved tensors: auto (8 under int2, else the mode's), off, "
                        "exact, or at least 2/4/8 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--threads", type=thread_count, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32, or bf16 autocast: exact bytes are then 2 per element (default: %(default)s)")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA only: per mode, the largest batch whose step fits in --budget-mb")
    p.add_argument("--budget-mb", type=float, metavar="M",
                   help="with --max-batch: step peak allowed, in MiB (default: what the GPU holds)")
    p.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several modes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    device = _device(args.device)
    if args.max_batch and not _is_cuda(device):
        raise ConfigError(f"--max-batch needs CUDA (it searches the GPU's memory); got --device {args.device}: "
                          "use --device cuda on a machine with a GPU")
    if args.budget_mb is not None and (not args.max_batch or args.budget_mb <= 0):
        raise ConfigError(f"--budget-mb must be a positive number of MiB used with --max-batch, got {args.budget_mb}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    check_model_data(args.model, args.data)
    dataset = load_dataset(args.data, args.data_dir, limit_train=args.batch_size, limit_test=1, seed=args.seed,
                           options=dict(args.data_options))
    info = dataset.info
    loader = BatchLoader(dataset.train_x, dataset.train_y, info, args.batch_size, train=True, seed=args.seed,
                         device=device)
    x, y = next(iter(loader.epoch(0)))
    torch.manual_seed(args.seed)
    model = build_model(args.model, info.input_shape, info.num_classes,
                        **{**dataset.model_args, **dict(args.model_options)}).to(device)
    options: dict[str, Any] = {"group_size": args.group_size} if args.group_size != 256 else {}
    if args.attention_bits != "auto":
        options["attention_bits"] = args.attention_bits
    precision = Precision(args.precision, device)
    if args.max_batch:
        return _max_batch(args, model, x, y, precision, options, device)
    with precision.context():
        exact_bytes = measure_activations(model, x, y, "exact").exact_bytes  # once, shared by all modes
        results = [measure_activations(model, x, y, mode, exact_bytes=exact_bytes,
                                       **(options if mode != "exact" else {}))
                   for mode in args.activations]
    peaks: dict[str, int] = {}
    if device.type == "cuda":
        stats = CudaMemoryStats(device)
        for mode in args.activations:
            peaks[mode] = _peak(model, x, y, mode, precision, options, stats)
    if args.json:
        payload = [dict(r.to_dict(), model=args.model, data=args.data, batch_size=int(y.shape[0]),
                        precision=args.precision, device=str(device),
                        **({"peak_bytes": peaks[r.mode]} if peaks else {}))
                   for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return 0
    print(f"{args.model} on {args.data}, batch {y.shape[0]}: bytes saved for backward by one step")
    if len(results) == 1:
        r = results[0]
        table = [(rec.module or "-", "x".join(map(str, rec.shape)), str(rec.dtype).replace("torch.", ""),
                 rec.kind + (f" ({rec.rule})" if rec.rule else ""), format_bytes(rec.exact_bytes),
                 format_bytes(rec.stored_bytes))
                for rec in r.records]
        print(format_table(("module", "shape", "dtype", "kept as", "exact", "stored"), table))
    summary = [(r.mode, format_bytes(r.exact_bytes), format_bytes(r.stored_bytes), f"{r.ratio:.2f}x")
               + ((format_bytes(peaks[r.mode]),) if peaks else ())
               for r in results]
    header = ("activations", f"exact_bytes ({args.precision})", "stored_bytes", "ratio")
    print(format_table(header + (("step peak (CUDA)",) if peaks else ()), summary))
    return 0


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
    return device


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, precision: Precision,
          options: dict[str, object]) -> None:
    """One forward+backward of ``model`` under ``mode`` and ``precision`` (gradients then dropped)."""
    act = Activations(model, mode, **(options if mode != "exact" else {}))
    try:
        with precision.context(), act:
            loss = cross_entropy(model(x), y)
        loss.backward()
    finally:
        act.close()
        model.zero_grad(set_to_none=True)


def _peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, precision: Precision,
          options: dict[str, object], stats: CudaMemoryStats) -> int:
    """Measured step peak (CUDA) of a copy of ``model``, less what was allocated before the step."""
    trained = copy.deepcopy(model).train()  # allocated before the step: not part of its peak
    return step_peak_bytes(lambda: _step(trained, x, y, mode, precision, options), stats)


def tiled_batch(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``size`` examples made by repeating the examples of ``(x, y)`` in order: real
    inputs of the data's dtype and label layout (token ids, per-token targets), at any size."""
    index = torch.arange(size, device=x.device) % x.shape[0]
    return x[index], y[index]


def _max_batch(args: argparse.Namespace, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               precision: Precision, options: dict[str, object], device: torch.device) -> int:
    budget = int(args.budget_mb * 2**20) if args.budget_mb is not None else None
    stats = CudaMemoryStats(device)
    rows = []
    for mode in args.activations:
        def trial(b: int, mode: str = mode) -> int:
            # The loaded batch repeated, not random floats: token models need integer ids, and
            # the labels keep the data's layout (one per sample or one per position).
            xb, yb = tiled_batch(x, y, b)
            try:
                return _peak(model, xb, yb, mode, precision, options, stats)
            finally:
                del xb, yb
                torch.cuda.empty_cache()

        found = largest_batch(trial, budget, start=args.batch_size)
        rows.append({"mode": mode, "max_batch": found.batch, "peak_bytes": found.peak_bytes,
                     "budget_bytes": budget, "model": args.model, "data": args.data,
                     "precision": args.precision, "device": str(device), "tried": found.tried})
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    limit = format_bytes(budget) if budget is not None else "the GPU's memory"
    print(f"{args.model} on {args.data} (its first {x.shape[0]} training examples, repeated), {args.precision}: "
          f"largest batch whose step peak fits {limit}")
    print(format_table(("activations", "max batch", "step peak"),
                       [(r["mode"], str(r["max_batch"]), format_bytes(r["peak_bytes"])) for r in rows]))
    return 0
