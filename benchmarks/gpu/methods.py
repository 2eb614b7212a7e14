"""Training throughput (samples/s) of bp, fr:2, ddg:2 and dni:2 on ResNet-20, one GPU.

Each method trains through ``gradkit.train`` (what ``gradkit train --device cuda`` runs) for two
epochs; the second epoch's ``samples_per_second`` is kept (the first pays CUDA start-up, kernel
selection and the one-off activation-memory measurement). Data: CIFAR-10 from ``data/`` in the
checkout (``make gpu-data`` copies ``cifar10-jpeg.tar.gz`` there) when present, else synthetic
CIFAR-shaped tensors (3x32x32, 10 classes; throughput does not depend on the pixel values). The
table says which.

    python benchmarks/gpu/methods.py                       # on the GPU machine
    python benchmarks/gpu/methods.py --device cpu --tiny   # smoke test anywhere (seconds)

Prints one table and appends one JSON line per method to ``--out`` (default
``benchmarks/gpu/results/methods.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import gradkit
from gradkit.data import Dataset, DatasetInfo, load_dataset

REPO = Path(__file__).resolve().parents[2]
METHODS = (("bp", 1), ("fr", 2), ("ddg", 2), ("dni", 2))


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo(name="synthetic-cifar", input_shape=(3, 32, 32), num_classes=10,
                       classes=tuple(str(c) for c in range(10)), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       augment=False, source="generated")
    return Dataset(info, torch.rand(n_train, 3, 32, 32, generator=g), torch.randint(0, 10, (n_train,), generator=g),
                   torch.rand(n_test, 3, 32, 32, generator=g), torch.randint(0, 10, (n_test,), generator=g))


def dataset(args: argparse.Namespace, n_train: int, n_test: int) -> tuple[Dataset, str]:
    data_dir = Path(args.data_dir)
    if (data_dir / "cifar10-jpeg.tar.gz").is_file() and not (args.tiny or args.synthetic):
        return (load_dataset("cifar10", str(data_dir), limit_train=n_train, limit_test=n_test, seed=0),
                f"CIFAR-10 ({data_dir / 'cifar10-jpeg.tar.gz'})")
    why = ("--tiny/--synthetic" if (args.tiny or args.synthetic) else f"no {data_dir / 'cifar10-jpeg.tar.gz'}")
    return synthetic_cifar(n_train, n_test), f"synthetic CIFAR-shaped tensors ({why})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a few small steps (smoke test, any device)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="training steps per epoch (default: %(default)s)")
    p.add_argument("--data-dir", default=str(REPO / "data"))
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic CIFAR-shaped tensors even when CIFAR-10 is there (its first load decodes "
                        "60,000 JPEGs: 2.5 minutes on a busy 2-core machine; cached afterwards)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "gpu" / "results" / "methods.jsonl"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("methods.py: --device cuda but no GPU here; use --device cpu --tiny", file=sys.stderr)
        return 2
    batch, steps = (16, 3) if args.tiny else (args.batch_size, args.steps)
    ds, source = dataset(args, batch * steps, batch * 2)
    rows = []
    for method, stages in METHODS:
        config = gradkit.TrainConfig(method=method, stages=stages, balance="time" if stages > 1 else "params",
                                     model="resnet20", data=ds.info.name, epochs=2, batch_size=batch,
                                     eval_batch_size=batch * 2, lr=0.05, seed=0, progress=False,
                                     device=args.device, precision=args.precision)
        start = time.perf_counter()
        result = gradkit.train(config, dataset=ds)
        last = result.final
        rows.append({"benchmark": "methods", "method": f"{method}:{stages}" if stages > 1 else method,
                     "model": "resnet20", "batch_size": batch, "steps_per_epoch": steps, "device": args.device,
                     "precision": args.precision, "data": source,
                     "samples_per_second": round(last["samples_per_second"], 1),
                     "train_loss": round(last["train_loss"], 4), "wall_seconds": round(time.perf_counter() - start, 1),
                     "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"ResNet-20, batch {batch}, {args.device}, {args.precision}; data: {source}")
    print(f"{'method':<8} {'samples/s':>10} {'vs bp':>7}")
    base = rows[0]["samples_per_second"] or 1.0
    for r in rows:
        print(f"{r['method']:<8} {r['samples_per_second']:>10.1f} {r['samples_per_second'] / base:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
