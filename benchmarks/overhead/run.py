"""Overhead of gradkit's training loop against a bare PyTorch loop (same model, batch and data).

Both loops train ResNet-20 on the same CIFAR-10 subset with the same augmentation (random crop with
4-pixel padding and horizontal flip, then normalisation), SGD with Nesterov momentum, batch 128. Each
run trains two epochs and the second epoch's training throughput is kept (the first warms up caches and
carries gradkit's one-off activation-memory measurement). The two loops alternate, repeated, and the
medians are compared.

    python benchmarks/overhead/run.py --repeats 3 --limit-train 2560
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gradkit
from gradkit.data import load_dataset
from gradkit.envinfo import collect


def bare_pytorch_epochs(dataset, *, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """A textbook PyTorch loop; returns samples/s of each epoch (training only)."""
    torch.manual_seed(seed)
    info = dataset.info
    model = gradkit.build_model("resnet20", info.input_shape, info.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    x_all, y_all = dataset.train_x, dataset.train_y
    n = len(y_all)
    rates = []
    model.train()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = x_all[idx].float().div_(255)
            # random crop (pad 4) + flip, written the plain way
            b, _, h, w = x.shape
            padded = nn.functional.pad(x, (4, 4, 4, 4))
            dy = torch.randint(0, 9, (b,), generator=g)
            dx = torch.randint(0, 9, (b,), generator=g)
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
            x = padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = (x - mean) / std
            y = y_all[idx]
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        rates.append(n / (time.perf_counter() - start))
    return rates


def gradkit_epochs(dataset, *, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    config = gradkit.TrainConfig(
        method="bp", model="resnet20", data="cifar10", epochs=epochs, batch_size=batch_size,
        lr=lr, lr_schedule="constant", seed=seed, progress=True, out=None,
    )
    result = gradkit.train(config, dataset=dataset)
    return [h["samples_per_second"] for h in result.history]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=2560)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    env = collect()
    print(f"# gradkit {env['packages']['gradkit']}, torch {env['packages']['torch']}, Python {env['python']}, "
          f"{env['cpu']} x{env['cpu_count']}, torch threads {torch.get_num_threads()}, "
          f"GPU: {', '.join(env['gpus']) or 'none'}")
    dataset = load_dataset("cifar10", args.data_dir, limit_train=args.limit_train, limit_test=500, seed=0)
    results = {"bare": [], "gradkit": []}
    records = []
    for r in range(args.repeats):
        for name, fn in (("bare", bare_pytorch_epochs), ("gradkit", gradkit_epochs)):
            rate = fn(dataset, epochs=2, batch_size=args.batch_size, lr=0.05, seed=r)[-1]
            results[name].append(rate)
            rec = {"repeat": r, "loop": name, "samples_per_second": rate}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    bare, ours = statistics.median(results["bare"]), statistics.median(results["gradkit"])
    summary = {
        "summary": True, "model": "resnet20", "data": "cifar10", "limit_train": args.limit_train,
        "batch_size": args.batch_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "bare_median": bare, "gradkit_median": ours, "ratio": ours / bare, "env": env,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "env"}))
    with args.output.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps(summary) + "\n")
    print(f"gradkit / bare PyTorch samples/s: {ours:.1f} / {bare:.1f} = {ours / bare:.3f}")
    return 0 if ours / bare >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
