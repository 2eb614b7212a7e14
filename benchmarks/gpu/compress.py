"""Approximate activations on a GPU: step time and peak memory of each mode relative to exact.

ResNet-56 on CIFAR-10 shapes (3x32x32, 10 classes), one SGD step (momentum 0.9) per timed step, at
batch 256 and 1024. For each batch size and mode (exact, int8, int4, int2, blpa4):

* time: median over ``--steps`` timed steps after ``--warmup`` untimed ones (CUDA-synchronised);
* peak: ``torch.cuda.max_memory_allocated()`` during one step, less what is allocated before it (the
  model, its gradients and the optimizer's state, which exist after the warm-up);

and prints a table of both as ratios to exact. Appends one JSON line per (batch, mode) to ``--out``.

    python benchmarks/gpu/compress.py                       # CUDA only
    python benchmarks/gpu/compress.py --device cpu --tiny   # smoke test of the script, no figures

Without CUDA (and without ``--device cpu``) it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradkit.compress import Activations
from gradkit.models import build_model

HERE = Path(__file__).resolve().parent
MODES = ("exact", "int8", "int4", "int2", "blpa4")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, batch: int, model_name: str, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    act = Activations(model, mode)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with act:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(max(1, warmup)):  # at least one: the optimizer state must exist before the peak
        step()
    _sync(device)
    peak = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    act.close()
    return {"mode": mode, "batch": batch, "model": model_name, "step_s": statistics.median(times),
            "peak_bytes": peak, "steps": steps, "warmup": warmup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    p.add_argument("--batches", default="256,1024")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="resnet56")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="batch 4, ResNet-20, 1+2 steps: checks the script runs")
    p.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu/compress.py needs a CUDA device (none found); use --device cpu --tiny "
              "only to check that the script runs", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    if args.tiny:
        batches, args.model, args.warmup, args.steps = [4], "resnet20", 1, 2
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    rows = []
    for batch in batches:
        results = {m: measure(m, batch, args.model, device, args.warmup, args.steps) for m in modes}
        ref = results.get("exact")
        for r in results.values():
            r.update(env)
            if ref is not None:
                r["time_ratio"] = r["step_s"] / ref["step_s"]
                if r["peak_bytes"] and ref["peak_bytes"]:
                    # As in the targets: how many times below exact ("4x below").
                    r["peak_ratio"] = ref["peak_bytes"] / r["peak_bytes"]
            rows.append(r)
    print(f"{args.model} on {env.get('gpu', device)}: ratios to exact (peak = max allocated during a step, "
          "less model and optimizer state)")
    print(f"{'batch':>6} {'mode':>6} {'step ms':>9} {'time x':>7} {'peak MiB':>9} {'x below':>7}")
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['batch']:>6} {r['mode']:>6} {r['step_s'] * 1e3:>9.1f} {r.get('time_ratio', float('nan')):>7.2f} "
              f"{peak:>9} {r.get('peak_ratio', float('nan')):>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} lines to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
