"""Approximate activations, side by side: bytes saved for backward, step time, largest batch, sequences.

Sub-benchmarks (each appends JSON lines to results.jsonl next to this file):

  memory    exact_bytes / stored_bytes / ratio per mode for ResNet-20 and ResNet-56 at batch 128
            (CIFAR-10 shapes), plus torch.utils.checkpoint per residual block, and the largest batch
            whose activations fit --budget-gib (the paper's Table 2, computed from measured bytes).
  speed     training-step time per mode relative to exact: modes interleaved within each repeat,
            medians reported (the machine is shared and noisy).
  sequence  beyond the paper: an LSTM on the AG News subset and a small Transformer encoder through
            the generic path, exact vs int8/int4/int2: test accuracy at equal epochs, bytes, step time.

Quick-profile accuracy on ResNet-20 is accuracy.py (it trains for a while).

    python benchmarks/approx-activations/run.py memory
    python benchmarks/approx-activations/run.py speed --repeats 5
    python benchmarks/approx-activations/run.py sequence
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradkit
from gradkit.compress import Activations, measure_activations
from gradkit.envinfo import collect
from gradkit.memory import SavedTensorsMeter

HERE = Path(__file__).resolve().parent
MODES = ("exact", "blpa8", "blpa4", "int8", "int4", "int2", "naive8")


def _env() -> dict[str, Any]:
    env = collect()
    return {"cpu": env["cpu"], "cpus": env["cpu_count"], "torch": env["packages"]["torch"],
            "threads": torch.get_num_threads(), "cuda": env["cuda_available"]}


def _write(out: Path, record: dict[str, Any]) -> None:
    record = {**record, "date": time.strftime("%Y-%m-%d %H:%M"), "env": _env()}
    print(json.dumps(record), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _cifar_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = gradkit.data.load_dataset("cifar10", limit_train=batch, limit_test=1, seed=seed)
    loader = gradkit.data.BatchLoader(data.train_x, data.train_y, data.info, batch, train=True, seed=seed)
    return next(iter(loader.epoch(0)))


class _Checkpointed(nn.Module):
    """Each residual block recomputed in backward (torch.utils.checkpoint): what a user would pick
    instead of compression. Only block inputs are saved."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, block in self.model.named_children():
            if name.startswith("stage") and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _checkpoint_bytes(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> int:
    wrapped = _Checkpointed(copy.deepcopy(model))
    params = [*wrapped.parameters(), *wrapped.buffers()]
    with SavedTensorsMeter(exclude=params) as meter:
        loss = F.cross_entropy(wrapped(x), y)
    loss.backward()
    return meter.bytes


def bench_memory(args: argparse.Namespace) -> None:
    x, y = _cifar_batch(args.batch_size)
    budget = int(args.budget_gib * 2**30)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = gradkit.build_model(name, (3, 32, 32), 10)
        exact = None
        rows = []
        for mode in MODES:
            m = measure_activations(model, x, y, mode)
            exact = m.exact_bytes
            rows.append((mode, m.stored_bytes))
        assert exact is not None
        rows.append(("checkpoint", _checkpoint_bytes(model, x, y)))
        for mode, stored in rows:
            per_sample = stored / args.batch_size
            _write(args.out, {
                "bench": "memory", "model": name, "batch_size": args.batch_size, "mode": mode,
                "exact_bytes": exact, "stored_bytes": stored, "ratio": round(exact / stored, 3),
                "budget_gib": args.budget_gib, "largest_batch": int(budget // per_sample),
            })


def _step_fn(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    """A plain SGD training step under ``mode`` (``checkpoint``: per-block recomputation)."""
    if mode == "checkpoint":
        net: nn.Module = _Checkpointed(model)  # type: ignore[arg-type]
        act = Activations(model, "exact")
    else:
        net = model
        act = Activations(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with act:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, act


def bench_speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x, y = _cifar_batch(args.batch_size)
    modes = args.modes.split(",")
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = gradkit.build_model(name, (3, 32, 32), 10)
        steps = {}
        for mode in modes:
            model = copy.deepcopy(base)
            steps[mode] = _step_fn(model, mode, x, y)[0]
            for _ in range(args.warmup):
                steps[mode]()
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.repeats):
            # Interleaved: every mode once per repeat, in a rotating order, so load drifts hit all.
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[mode]()
                times[mode].append((time.perf_counter() - t0) / args.steps)
        exact_med = statistics.median(times["exact"])
        for mode in modes:
            ratios = [t / e for t, e in zip(times[mode], times["exact"], strict=True)]
            _write(args.out, {
                "bench": "speed", "model": name, "batch_size": args.batch_size, "mode": mode,
                "step_seconds": [round(t, 4) for t in times[mode]],
                "median_step_seconds": round(statistics.median(times[mode]), 4),
                "median_ratio_to_exact": round(statistics.median(times[mode]) / exact_med, 3),
                "median_of_paired_ratios": round(statistics.median(ratios), 3),
                "steps_per_repeat": args.steps, "repeats": args.repeats,
            })


class _TinyTransformer(nn.Module):
    """Token embedding + learned positions, one pre-norm encoder layer (4 heads, GELU), mean pool."""

    def __init__(self, vocab: int, num_classes: int, length: int, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        self.block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long().flatten(1)
        return self.fc(self.block(self.embed(tokens) + self.pos).mean(dim=1))


def bench_sequence(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = gradkit.data.load_dataset("ag-news")
    info = data.info
    length = info.input_shape[-1]
    vocab = int(data.model_args["vocab_size"])
    x0 = data.train_x[: args.batch_size]
    y0 = data.train_y[: args.batch_size]
    for model_name in ("lstm", "transformer"):
        for mode in args.modes.split(","):
            torch.manual_seed(args.seed)
            if model_name == "lstm":
                model = gradkit.build_model("lstm", info.input_shape, info.num_classes, vocab_size=vocab)
            else:
                model = _TinyTransformer(vocab, info.num_classes, length)
            mem = measure_activations(model, x0, y0, mode)
            act = Activations(model, mode)
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            gen = torch.Generator().manual_seed(args.seed)
            step_times = []
            for _ in range(args.epochs):
                order = torch.randperm(len(data.train_y), generator=gen)
                for i in range(0, len(order), args.batch_size):
                    idx = order[i:i + args.batch_size]
                    t0 = time.perf_counter()
                    with act:
                        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step_times.append(time.perf_counter() - t0)
            model.eval()
            with torch.no_grad():
                acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
            act.close()
            _write(args.out, {
                "bench": "sequence", "model": model_name, "data": "ag-news", "mode": mode,
                "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": f"adam lr {args.lr}",
                "test_acc": round(acc, 4), "exact_bytes": mem.exact_bytes, "stored_bytes": mem.stored_bytes,
                "ratio": round(mem.ratio, 3), "median_step_seconds": round(statistics.median(step_times), 4),
                "train_samples": len(data.train_y), "test_samples": len(data.test_y),
            })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    sub = p.add_subparsers(dest="bench", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--models", default="resnet20,resnet56")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--budget-gib", type=float, default=4.0)
    m.set_defaults(run=bench_memory)
    s = sub.add_parser("speed")
    s.add_argument("--models", default="resnet20")
    s.add_argument("--modes", default="exact,blpa4,int4,blpa8,int8,int2,naive8,checkpoint")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(run=bench_speed)
    q = sub.add_parser("sequence")
    q.add_argument("--modes", default="exact,int8,int4,int2")
    q.add_argument("--epochs", type=int, default=3)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1)
    q.set_defaults(run=bench_sequence)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
