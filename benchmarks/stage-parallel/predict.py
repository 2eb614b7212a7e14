"""Cost model: predicted speed-up of FR / DDG / the synchronous pipeline for K = 2..8 devices.

Profiles every block of a model (forward, backward, output bytes) on one CIFAR-10-sized batch with
the thread count one worker gets, then predicts, with ``gradkit.stages.cost_model``, the step time
of each method for K = 2..8 devices (each as fast as the profiled one, messages at ``--bandwidth``),
as a speed-up over single-process backprop on one such device. ``--check`` compares the K=2 prediction
with the measured samples/s of ``run.py`` (results/results.jsonl, same model, latest session).

    python benchmarks/stage-parallel/predict.py --models resnet20,resnet56 --threads 1 --check
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gradkit.models import build_model
from gradkit.stages import profile_blocks
from gradkit.stages.cost_model import (
    DEFAULT_BANDWIDTH,
    DEFAULT_LATENCY,
    backprop_seconds,
    balanced_sizes,
    predict_speedups,
    predict_step_seconds,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.jsonl"


def measured_speedups(model: str) -> dict[str, float]:
    """Median samples/s of each method over bp-t1's, from the latest quick-profile session of ``model``."""
    if not RESULTS.is_file():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("model") == model and r.get("profile") == "quick"
            and r.get("samples_per_second")]
    if not rows:
        return {}
    session = max(r["session"] for r in rows)
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["session"] == session:
            by.setdefault(r["method"], []).append(r["samples_per_second"])
    if "bp-t1" not in by:
        return {}
    base = statistics.median(by["bp-t1"])
    return {m: statistics.median(v) / base for m, v in by.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--methods", default="fr,ddg,bp")
    parser.add_argument("--threads", type=int, default=1, help="threads of one worker (default 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="bytes/s per message link")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY, help="seconds per message")
    parser.add_argument("--check", action="store_true", help="compare K=2 with run.py's measured speed-ups")
    parser.add_argument("--json", type=Path, help="also write the predictions to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = []
    for name in args.models.split(","):
        model = build_model(name, (3, 32, 32), 10)
        sample = torch.randn(args.batch_size, 3, 32, 32)
        costs = profile_blocks(model, sample, threads=args.threads, repeats=5)
        base = backprop_seconds(costs)
        print(f"\n{name}: {len(costs)} blocks, backprop {1e3 * base:.1f} ms per step with {args.threads} thread(s)")
        print("method  " + "  ".join(f"K={k:<5d}" for k in range(2, 9)))
        for method in args.methods.split(","):
            preds = predict_speedups(costs, range(2, 9), method, bandwidth_bytes_per_s=args.bandwidth,
                                     latency_s=args.latency)
            print(f"{method:6s}  " + "  ".join(f"{p.speedup:5.2f}x " for p in preds))
            report.append({"model": name, "method": method, "threads": args.threads,
                           "backprop_ms": 1e3 * base,
                           "predicted": {p.k: {"sizes": list(p.sizes), "speedup": p.speedup} for p in preds}})
        if args.check:
            measured = measured_speedups(name)
            for method, key in (("fr", "fr-w2"), ("ddg", "ddg-w2"), ("bp", "bp-w2")):
                sizes = balanced_sizes(costs, 2, method, bandwidth_bytes_per_s=args.bandwidth,
                                       latency_s=args.latency)
                predicted = base / predict_step_seconds(method, costs, sizes, bandwidth_bytes_per_s=args.bandwidth,
                                                        latency_s=args.latency)
                got = measured.get(key)
                print(f"check {method} K=2 sizes {sizes}: predicted {predicted:.2f}x, measured "
                      + (f"{got:.2f}x" if got is not None else "n/a (run run.py first)"))
                report.append({"model": name, "method": method, "check_k2": {"sizes": sizes, "predicted": predicted,
                                                                              "measured": got}})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
