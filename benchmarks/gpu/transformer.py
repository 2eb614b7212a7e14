"""Step time and peak memory of a 6-layer Transformer encoder under each ``--activations`` mode.

The model is ``torch.nn.TransformerEncoder`` (6 layers, width 512, 8 heads, feed-forward 2048,
pre-norm, GELU) between a token embedding and a classifier, as an ``nn.Sequential`` so that
``gradkit.compress.Activations`` sees it like any gradkit model; batch 16 of 512 tokens, AdamW. Per
mode: the median time of one full step (forward, backward, optimizer) over ``--repeats`` timed steps
after warm-up, and the step's peak memory (``torch.cuda.max_memory_allocated`` during the step less
what was allocated before it: weights, AdamW state, the batch). Ratios are against ``exact``.

The fused attention kernel (``need_weights=False`` fast path) saves its own tensors; the generic
saved-tensor hooks compress whatever autograd saves, attention included.

    python benchmarks/gpu/transformer.py                       # on the GPU machine
    python benchmarks/gpu/transformer.py --device cpu --tiny   # smoke test anywhere (seconds)

Prints one table and appends one JSON line per mode to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress import Activations
from gradkit.memory import CudaMemoryStats, step_peak_bytes
from gradkit.precision import Precision

REPO = Path(__file__).resolve().parents[2]
MODES = ("exact", "int8", "int4", "int2")


class Encoder(nn.Sequential):
    """Embedding -> TransformerEncoder -> mean pool -> classifier, as a Sequential of blocks."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, classes: int) -> None:
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        super().__init__(
            nn.Embedding(vocab, width),
            # enable_nested_tensor needs post-norm; the stack runs its layers in order.
            nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
            MeanPool(),
            nn.Linear(width, classes),
        )


class MeanPool(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
            device: torch.device) -> dict[str, object]:
    model = copy.deepcopy(base).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    act = Activations(model, mode)
    precision = Precision(args.precision, device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with precision.context(), act:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):  # also creates AdamW's state, so it counts as "before"
        step()
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = step_peak_bytes(step, CudaMemoryStats(device)) if device.type == "cuda" else None
    act.close()
    return {"mode": mode, "step_seconds": statistics.median(times), "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2 layers, width 64, 32 tokens, batch 2 (smoke test)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "gpu" / "results" / "transformer.jsonl"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("transformer.py: --device cuda but no GPU here; use --device cpu --tiny", file=sys.stderr)
        return 2
    layers, width, tokens, batch = (2, 64, 32, 2) if args.tiny else (6, 512, 512, 16)
    if args.tiny:
        args.warmup, args.repeats = 1, 2
    torch.manual_seed(0)
    base = Encoder(vocab=1000, width=width, layers=layers, heads=8, classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (batch, tokens), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    rows = [measure(m, base, x, y, args, device) for m in args.modes.split(",")]
    exact = rows[0]
    for r in rows:
        r.update(benchmark="transformer", layers=layers, width=width, tokens=tokens, batch_size=batch,
                 device=str(device), precision=args.precision, torch=torch.__version__,
                 gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 time_ratio=round(float(r["step_seconds"]) / float(exact["step_seconds"]), 3),  # type: ignore[arg-type]
                 peak_ratio=(round(float(exact["peak_bytes"]) / float(r["peak_bytes"]), 3)  # type: ignore[arg-type]
                             if r["peak_bytes"] and exact["peak_bytes"] else None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"Transformer encoder {layers}x{width}, {tokens} tokens, batch {batch}, AdamW, {device}, {args.precision}")
    print(f"{'mode':<7} {'step ms':>8} {'time vs exact':>14} {'peak MiB':>9} {'exact/peak':>11}")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"  # type: ignore[operator]
        ratio = f"{r['peak_ratio']:.2f}x" if r["peak_ratio"] else "-"
        print(f"{r['mode']:<7} {1000 * float(r['step_seconds']):>8.1f} {r['time_ratio']:>13.2f}x {peak:>9} {ratio:>11}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
