"""Features Replay against backprop, DDG and DNI: the FR paper's Table 2, Fig. 4 and Fig. 5, scaled down.

Every run is a normal ``gradkit.train`` run folder under ``--out`` (default ``runs/bench-fr/<profile>``),
so an interrupted benchmark continues where it stopped (finished runs are skipped, a half-finished one
resumes from its checkpoint). When all runs are done the script writes, next to them:

* ``results.jsonl``: one line per run (best test error, final accuracy, epoch time, memory per stage, σ);
* ``loss_<model>_k<K>.png``: loss against epochs and against training time (Fig. 4);
* ``memory_<model>.png``: activation memory against K per method (Fig. 5);
* ``sigma_<model>.png``: the sufficient-direction constant σ per epoch (Fig. 3);
* ``report.md``: the tables that go into this folder's README.

Optimizer settings follow the paper (SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 128,
learning rate divided by 10 at 50% and 75% of training), with the epoch budget scaled down. The
initial rate is the paper's 0.01 in the full profile; the quick profile uses 0.05 because with only
5 epochs 0.01 leaves ResNet-20 at 40% test accuracy (measured), too undertrained to compare methods.

    python benchmarks/features-replay/run.py --profile quick          # 2 CPU cores: about an hour
    python benchmarks/features-replay/run.py --profile full           # a GPU: the paper's 300 epochs
    python benchmarks/features-replay/run.py --profile quick --report # tables and plots only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gradkit
from gradkit.data import load_dataset
from gradkit.envinfo import collect, format_env
from gradkit.runs import format_bytes, read_run


@dataclasses.dataclass(frozen=True)
class Profile:
    models: tuple[str, ...]
    stages: dict[str, tuple[int, ...]]
    """K values per model."""
    epochs: dict[str, int]
    limit_train: int | None
    limit_test: int | None
    methods: tuple[str, ...] = ("bp", "fr", "ddg", "dni")
    measure_direction: int = 20
    lr: float = 0.05


PROFILES = {
    # Sized for 2 CPU cores: ResNet-20 at K = 2, 3, 4, ResNet-56 at K = 2, on a 10k-image subset.
    "quick": Profile(
        models=("resnet20", "resnet56"),
        stages={"resnet20": (2, 3, 4), "resnet56": (2,)},
        epochs={"resnet20": 5, "resnet56": 3},
        limit_train=10_000,
        limit_test=5_000,
    ),
    # The paper's setting, for a GPU: all of CIFAR-10, 300 epochs.
    "full": Profile(
        models=("resnet20", "resnet56"),
        stages={"resnet20": (2, 3, 4), "resnet56": (2, 3, 4)},
        epochs={"resnet20": 300, "resnet56": 300},
        limit_train=None,
        limit_test=None,
        measure_direction=200,
        lr=0.01,
    ),
    # A smoke test of the script itself (seconds).
    "smoke": Profile(
        models=("resnet20",),
        stages={"resnet20": (2,)},
        epochs={"resnet20": 1},
        limit_train=256,
        limit_test=256,
        measure_direction=2,
    ),
}


def run_name(method: str, k: int) -> str:
    return "bp" if method == "bp" else f"{method}-k{k}"


def planned_runs(profile: Profile) -> list[tuple[str, str, int]]:
    """(model, method, K) of every run, smallest K first; backprop once per model (its result does not
    depend on K). An interrupted benchmark thus has the K=2 comparison first."""
    runs = []
    for model in profile.models:
        runs.append((model, "bp", 1))
        for k in profile.stages[model]:
            runs.extend((model, m, k) for m in profile.methods if m != "bp")
    return runs


def train_all(profile: Profile, out: Path, args: argparse.Namespace) -> None:
    dataset = load_dataset("cifar10", args.data_dir, limit_train=profile.limit_train,
                           limit_test=profile.limit_test, seed=0)
    plan = planned_runs(profile)
    for n, (model, method, k) in enumerate(plan, start=1):
        folder = out / model / run_name(method, k)
        done = folder / "model.pt"
        if done.is_file():
            continue
        config = gradkit.TrainConfig(
            method=method, model=model, data="cifar10", stages=k, balance="time",
            epochs=profile.epochs[model], batch_size=128, optimizer="sgd", lr=profile.lr, momentum=0.9,
            nesterov=True, weight_decay=5e-4, lr_schedule="multistep", seed=0, threads=args.threads,
            device=args.device, out=str(folder), resume=(folder / "checkpoint.pt").is_file(),
            measure_direction=profile.measure_direction, progress=not args.no_progress,
            limit_train=profile.limit_train, limit_test=profile.limit_test,
        )
        print(f"[{n}/{len(plan)}] {model} {run_name(method, k)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            gradkit.train(config, dataset=dataset)
        except gradkit.errors.TrainingDiverged as exc:
            (folder / "DIVERGED").write_text(str(exc) + "\n")
            print(f"  diverged: {exc}", file=sys.stderr)
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def summarise(folder: Path, model: str, method: str, k: int) -> dict[str, Any] | None:
    if not (folder / "metrics.jsonl").is_file():
        return None
    run = read_run(folder)
    h = run.history
    if not h:
        return None
    sigmas = [r.get("direction_sigma_mean") for r in h]
    return {
        "model": model,
        "method": method,
        "stages": k,
        "epochs": len(h),
        "diverged": (folder / "DIVERGED").is_file(),
        "best_test_error": 100 * (1 - max(r["test_acc"] for r in h)),
        "final_test_acc": h[-1]["test_acc"],
        "final_train_loss": h[-1]["train_loss"],
        "epoch_seconds": statistics.median(r["epoch_seconds"] for r in h),
        "samples_per_second": statistics.median(r["samples_per_second"] for r in h),
        "activation_bytes": h[-1].get("activation_bytes"),
        "stage_memory": h[-1].get("stage_memory"),
        "sigma_per_epoch": sigmas,
        "sigma_min_per_epoch": [r.get("direction_sigma_min") for r in h],
        "cosine_per_epoch": [r.get("direction_cosine_mean") for r in h],
        "stage_sizes": run.config.get("stage_sizes"),
        "run_dir": str(folder),
    }


def report(profile: Profile, out: Path, profile_name: str) -> str:
    rows = []
    for model, method, k in planned_runs(profile):
        row = summarise(out / model / run_name(method, k), model, method, k)
        if row is not None:
            rows.append(row)
    with (out / "results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    _plots(profile, out, rows)

    lines = [f"## Profile `{profile_name}`", "", "```", format_env(collect()), "```", ""]
    for model in profile.models:
        mine = [r for r in rows if r["model"] == model]
        bp = next((r for r in mine if r["method"] == "bp"), None)
        lines.append(f"### {model}: {profile.epochs[model]} epochs, "
                     f"{profile.limit_train or 50000} training images, {profile.limit_test or 10000} test images, "
                     f"lr {profile.lr}")
        lines.append("")
        table = []
        for r in mine:
            acc_gap = (r["final_test_acc"] - bp["final_test_acc"]) * 100 if bp else float("nan")
            mem_ratio = (r["activation_bytes"] / bp["activation_bytes"]
                         if bp and r["activation_bytes"] and bp["activation_bytes"] else float("nan"))
            sigma = [s for s in r["sigma_per_epoch"] if s is not None]
            table.append([
                r["method"], str(r["stages"]) if r["method"] != "bp" else "-",
                f"{r['best_test_error']:.2f}" + (" (diverged)" if r["diverged"] else "")
                + (f" (unfinished: {r['epochs']} of {profile.epochs[model]} epochs)"
                   if r["epochs"] < profile.epochs[model] and not r["diverged"] else ""),
                f"{100 * r['final_test_acc']:.2f}", f"{acc_gap:+.2f}",
                f"{r['epoch_seconds']:.1f}", format_bytes(r["activation_bytes"]), f"{mem_ratio:.2f}x",
                f"{sigma[-1]:.3f}" if sigma else "-",
            ])
        lines.append(_markdown(["method", "K", "best test error %", "final acc %", "vs bp (points)",
                                "epoch s", "activation memory", "vs bp", "σ last epoch"], table))
        lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _plots(profile: Profile, out: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install gradkit[plot])", file=sys.stderr)
        return
    from gradkit.plot import plot_runs

    for model in profile.models:
        mine = [r for r in rows if r["model"] == model]
        for k in profile.stages[model]:
            folders = [r["run_dir"] for r in mine if r["method"] == "bp" or r["stages"] == k]
            if folders:
                plot_runs(folders, out / f"loss_{model}_k{k}.png", title=f"{model} on CIFAR-10, K={k}")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in profile.methods:
            pts = sorted((r["stages"], r["activation_bytes"]) for r in mine
                         if r["method"] == method and r["activation_bytes"])
            if method == "bp" and pts:
                pts = [(k, pts[0][1]) for k in profile.stages[model]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o", label=method)
        ax.set_xlabel("stages K")
        ax.set_ylabel("activation memory per step (MiB)")
        ax.set_title(f"{model}, batch 128")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"memory_{model}.png", dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in mine:
            if r["method"] == "bp":
                continue
            sig = r["sigma_per_epoch"]
            ax.plot(range(1, len(sig) + 1), [s if s is not None else float("nan") for s in sig],
                    marker=".", label=f"{r['method']} K={r['stages']}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("σ (mean over measured steps)")
        ax.set_title(f"sufficient direction, {model}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"sigma_{model}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, help="default: runs/bench-fr/<profile>")
    parser.add_argument("--data-dir", help="folder with CIFAR-10 (default: the standard places)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots of finished runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    profile = PROFILES[args.profile]
    out = args.out or Path("runs/bench-fr") / args.profile
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        train_all(profile, out, args)
    print(report(profile, out, args.profile))
    print(f"\nresults: {out / 'results.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
