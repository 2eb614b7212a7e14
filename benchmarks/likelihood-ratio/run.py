"""ULR (likelihood-ratio gradients) side by side with backprop and the perturbation peers.

Each row trains one (method, model, data) with ``gradkit.train`` and records test accuracy at equal
epochs, wall time, and forward passes per step (in units of one forward of the batch through the whole
model; a noisy copy that re-runs only the blocks after its layer counts that fraction). Groups:

* ``fmnist-mlp``: Fashion-MNIST MLP, 5 epochs: bp, ulr, hybrid ulr --stages 2 (acceptance criteria 1);
* ``peers``: ulr vs spsa / forward-grad / es given the same forward passes per step as ulr, one epoch
  on 10,000 images (criterion 3);
* ``cosine``: per-layer cosine to backprop on one batch (``gradkit diagnose``) for the default and ablations;
* ``robust``: FGSM / PGD / Gaussian accuracy of the fmnist-mlp bp and ulr runs;
* ``profiles``: short runs: Fashion-MNIST CNN and SNN, AG News RNN/GRU/LSTM, GCN on karate;
* ``cifar``: short CIFAR-10 runs of the paper's ResNet-5 and VGG-8 (Adam 1e-3, batch 100, 2 epochs on
  stratified subsets): bp, plain ulr and hybrid ulr --stages 2. The paper's 100 epochs are a GPU job.

    python benchmarks/likelihood-ratio/run.py                      # everything (about an hour on 2 cores)
    python benchmarks/likelihood-ratio/run.py --only cosine robust
    OMP_WAIT_POLICY=PASSIVE python benchmarks/likelihood-ratio/run.py --only cifar   # about 18 minutes

Results are appended to ``results.jsonl`` beside this file (one JSON object per row, with the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradkit
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.diagnose import diagnose
from gradkit.envinfo import collect
from gradkit.errors import TrainingDiverged
from gradkit.models import build_model
from gradkit.robustness import attacked_accuracy

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/bench-likelihood-ratio")
# One thread: on a shared 2-core machine, two threads spin-wait on each other (see the README).
THREADS = 1


def machine() -> str:
    env = collect()
    return f"{env.get('cpu', '?')} ({env.get('cpu_count')} cores), {THREADS} torch thread, torch {torch.__version__}"


def record(row: dict[str, Any], out: Path) -> None:
    row = {**row, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M")}
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def cli(name: str, **fields: Any) -> str:
    """The ``gradkit train`` command line equivalent to ``train_row(name, ..., **fields)``."""
    args = ["gradkit train", f"--method {fields.get('method', 'bp')}"]
    if fields.get("stages", 1) != 1:
        args.append(f"--stages {fields['stages']}")
    args += [f"-o {k}={v}" for k, v in fields.get("method_options", {}).items()]
    flags = ("model", "data", "optimizer", "lr", "batch_size", "epochs", "limit_train", "limit_test")
    args += [f"--{k.replace('_', '-')} {fields[k]}" for k in flags if k in fields]
    return " ".join(args + [f"--threads {THREADS} --out {RUNS / name}"])


def train_row(name: str, out: Path, **fields: Any) -> dict[str, Any]:
    config = TrainConfig(out=str(RUNS / name), progress=False, threads=THREADS, **fields)
    if (RUNS / name / "model.pt").exists():
        import shutil

        shutil.rmtree(RUNS / name)
    start = time.perf_counter()
    try:
        result = gradkit.train(config)
    except TrainingDiverged as exc:
        row = {"group": fields.get("data"), "name": name, "method": config.method, "model": config.model,
               "options": config.method_options, "lr": config.effective_lr, "diverged": str(exc)}
        record(row, out)
        return row
    wall = time.perf_counter() - start
    method = result.method
    passes = getattr(getattr(method, "estimator", method), "forward_passes", None)
    row = {
        "group": fields.get("data"), "name": name, "method": config.method, "model": config.model,
        "data": config.data, "stages": config.stages, "options": config.method_options, "lr": config.effective_lr,
        "epochs": config.epochs, "limit_train": config.limit_train,
        **({"limit_test": config.limit_test, "optimizer": config.optimizer, "batch_size": config.batch_size,
            "command": cli(name, **fields)} if config.data.startswith("cifar") else {}),
        "test_acc": result.final["test_acc"], "per_epoch_acc": [h["test_acc"] for h in result.history],
        "train_seconds": result.final["elapsed_seconds"], "wall_seconds": wall,
        "forward_passes_per_step": passes,
    }
    record(row, out)
    return row


def ulr_forward_passes(model: str, data: str) -> float:
    """Forward passes of one default ``ulr`` step (each noisy copy counted as a full forward)."""
    ds = load_dataset(data, limit_train=256)
    net = build_model(model, ds.info.input_shape, ds.info.num_classes, **ds.model_args)
    method = gradkit.methods.build("ulr", [net])
    x, y = next(iter(BatchLoader(ds.train_x, ds.train_y, ds.info, 128, train=True).epoch(0)))
    method.step(x, y)
    return float(method.estimator.forward_passes)  # type: ignore[attr-defined]


def fmnist_mlp(out: Path, epochs: int, skip: set[str]) -> None:
    base = dict(model="mlp", data="fashion-mnist", epochs=epochs)
    for name, fields in (("mlp-bp", {"method": "bp"}), ("mlp-ulr", {"method": "ulr"}),
                         ("mlp-ulr-k2", {"method": "ulr", "stages": 2})):
        if name not in skip:
            train_row(name, out, **fields, **base)


def peers(out: Path, epochs: int, limit_train: int) -> None:
    """ulr against spsa / forward-grad / es at the same forward passes per step (a shorter run: the
    peers' cost per step equals ulr's)."""
    base = dict(model="mlp", data="fashion-mnist", epochs=epochs, limit_train=limit_train)
    train_row("peers-ulr", out, method="ulr", **base)
    passes = ulr_forward_passes("mlp", "fashion-mnist")
    # Equal forward passes per step: spsa/es use two per direction, forward-grad one JVP per direction
    # (a JVP costs more than a forward; counting it as one favours forward-grad).
    # Their estimates are far noisier (hence larger), so each peer gets the best of three learning rates.
    for lr in (0.05, 0.005, 0.0005):
        train_row(f"peers-spsa-lr{lr}", out, method="spsa", lr=lr,
                  method_options={"directions": max(1, round(passes / 2))}, **base)
        train_row(f"peers-forward-grad-lr{lr}", out, method="forward-grad", lr=lr,
                  method_options={"directions": max(1, round(passes))}, **base)
        train_row(f"peers-es-lr{lr}", out, method="es", lr=lr,
                  method_options={"directions": max(1, round(passes / 2))}, **base)


def cosine(out: Path) -> None:
    torch.set_num_threads(THREADS)
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("default", {}, 1),
        ("copies=16", {"copies": 16}, 1),
        ("copies=256", {"copies": 256}, 1),
        ("baseline=none", {"baseline": "none"}, 1),
        ("baseline=antithetic", {"baseline": "antithetic"}, 1),
        ("layerwise=false", {"layerwise": False}, 1),
        ("sampler=qmc", {"sampler": "qmc"}, 1),
        ("inject=weight", {"inject": "weight"}, 1),
        ("hybrid K=2", {}, 2),
        ("hybrid K=2 copies=64", {"copies": 64}, 2),
    ]
    for label, options, stages in variants:
        config = TrainConfig(method="ulr", model="mlp", data="fashion-mnist", method_options=options, stages=stages)
        result = diagnose(config, repeats=3)
        record({"group": "cosine", "name": f"mlp {label}", "model": "mlp", "options": options, "stages": stages,
                "forward_passes_per_step": result["forward_passes"],
                "cosines": {r["name"]: round(r["cosine"], 3) for r in result["layers"]}}, out)
    for method, options in (("spsa", {"directions": 49}), ("forward-grad", {"directions": 99})):
        config = TrainConfig(method=method, model="mlp", data="fashion-mnist", method_options=options)
        result = diagnose(config, repeats=3)
        record({"group": "cosine", "name": f"mlp {method}", "model": "mlp", "options": options,
                "cosines": {r["name"]: round(r["cosine"], 3) for r in result["layers"]}}, out)
    config = TrainConfig(method="ulr", model="cnn", data="fashion-mnist")
    result = diagnose(config, repeats=1)
    record({"group": "cosine", "name": "cnn default", "model": "cnn", "options": {},
            "forward_passes_per_step": result["forward_passes"],
            "cosines": {r["name"]: round(r["cosine"], 3) for r in result["layers"]}}, out)


def robust(out: Path) -> None:
    torch.set_num_threads(THREADS)
    ds = load_dataset("fashion-mnist", limit_test=2000)
    loader = BatchLoader(ds.test_x, ds.test_y, ds.info, 500, train=False)
    for name in ("mlp-bp", "mlp-ulr"):
        weights = RUNS / name / "model.pt"
        if not weights.exists():
            print(f"skip robustness of {name}: run the fmnist-mlp group first", file=sys.stderr)
            continue
        model = build_model("mlp", ds.info.input_shape, ds.info.num_classes)
        model.load_state_dict(torch.load(weights, weights_only=True))
        for attack, eps in (("fgsm", 0.02), ("fgsm", 0.05), ("pgd", 0.02), ("gaussian", 0.1)):
            torch.manual_seed(0)
            clean, attacked = attacked_accuracy(model, loader, attack, eps)
            record({"group": "robust", "name": name, "attack": attack, "eps": eps, "clean_acc": clean,
                    "attacked_acc": attacked}, out)


def profiles(out: Path) -> None:
    fm = dict(data="fashion-mnist", limit_train=6000, limit_test=2000, epochs=1)
    train_row("cnn-bp", out, method="bp", model="cnn", **fm)
    train_row("cnn-ulr", out, method="ulr", model="cnn", method_options={"copies": 16}, **fm)
    train_row("cnn-ulr-k2", out, method="ulr", model="cnn", stages=2, **fm)
    train_row("snn-bp", out, method="bp", model="snn", **fm)
    train_row("snn-ulr", out, method="ulr", model="snn", method_options={"copies": 32, "sigma": 0.05}, **fm)
    for model in ("rnn", "gru", "lstm"):
        text = dict(model=model, data="ag-news", epochs=3, optimizer="adam")
        train_row(f"{model}-bp", out, method="bp", **text)
        train_row(f"{model}-ulr", out, method="ulr", method_options={"copies": 32}, **text)
    graph = dict(model="gcn", data="karate", epochs=100, optimizer="adam", lr=0.01)
    train_row("gcn-bp", out, method="bp", **graph)
    train_row("gcn-ulr", out, method="ulr", **graph)


def cifar(out: Path) -> None:
    """CIFAR-10 ResNet-5 and VGG-8, the paper's optimizer (Adam 1e-3, batch 100), 2 epochs. bp and hybrid
    ulr --stages 2 on 5,000 train images; plain ulr costs 50-80x bp per image (one re-run per noisy copy
    per layer, 1 CPU thread), so it and a bp row to compare with get 1,000."""
    paper = dict(data="cifar10", optimizer="adam", lr=0.001, batch_size=100, epochs=2, limit_test=2000)
    for model in ("resnet5", "vgg8"):
        train_row(f"cifar-{model}-bp", out, method="bp", model=model, limit_train=5000, **paper)
        train_row(f"cifar-{model}-ulr-k2", out, method="ulr", stages=2, model=model,
                  method_options={"copies": 32}, limit_train=5000, **paper)
        train_row(f"cifar-{model}-bp-1k", out, method="bp", model=model, limit_train=1000, **paper)
        train_row(f"cifar-{model}-ulr", out, method="ulr", model=model, method_options={"copies": 16},
                  limit_train=1000, **paper)


GROUPS = {"fmnist-mlp": None, "peers": None, "cosine": cosine, "robust": robust, "profiles": profiles,
          "cifar": cifar}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), help="groups to run (default: all)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the fmnist-mlp group (default: 5)")
    parser.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--skip", nargs="+", default=[], metavar="ROW", help="fmnist-mlp rows not to rerun (e.g. mlp-bp)")
    args = parser.parse_args()
    for group in args.only or list(GROUPS):
        if group == "fmnist-mlp":
            fmnist_mlp(args.out, args.epochs, set(args.skip))
        elif group == "peers":
            peers(args.out, epochs=1, limit_train=10000)
        else:
            GROUPS[group](args.out)  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    sys.exit(main())
