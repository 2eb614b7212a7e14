"""Quick-profile accuracy: ResNet-20 on a stratified CIFAR-10 subset, every --activations mode.

Each mode trains with the same seed, data order, augmentation and schedule; only how activations are
kept for backward differs. Appends one JSON line per run to results.jsonl.

The quick profile is 10,000 training images and 10 epochs (about 8 minutes per mode and seed on one
core of our CPU); 4 epochs proved too short to separate a 0.5-point effect (README, section 3).

    python benchmarks/approx-activations/accuracy.py --modes exact,blpa4,int4 --seeds 0,1,2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gradkit
from gradkit.envinfo import collect

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--modes", default="exact,blpa4,int4,naive8,blpa8,int2")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataset = None
    env = collect()
    print(json.dumps({"env": env}), flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in args.modes.split(","):
            config = gradkit.TrainConfig(
                method="bp", model=args.model, data="cifar10", epochs=args.epochs, seed=seed,
                limit_train=args.limit_train, limit_test=args.limit_test, activations=mode,
                progress=False, threads=args.threads,
            )
            if dataset is None:
                dataset = gradkit.data.load_dataset("cifar10", limit_train=args.limit_train,
                                                    limit_test=args.limit_test, seed=seed)
            start = time.perf_counter()
            result = gradkit.train(config, dataset=dataset)
            record = {
                "bench": "accuracy", "model": args.model, "mode": mode, "seed": seed,
                "epochs": args.epochs, "limit_train": args.limit_train,
                "test_samples": int(dataset.test_y.numel()),
                "test_acc": [h["test_acc"] for h in result.history],
                "final_test_acc": result.final["test_acc"],
                "activation_bytes": result.final.get("activation_bytes"),
                "samples_per_second": [h["samples_per_second"] for h in result.history],
                "wall_seconds": time.perf_counter() - start,
                "env": {"cpu": env["cpu"], "cpus": env["cpu_count"], "torch": env["packages"]["torch"]},
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
