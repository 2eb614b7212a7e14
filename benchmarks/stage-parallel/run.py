"""Stage-parallel training against single-process and data-parallel backprop, on the same cores.

Six ways to spend K cores (K = 2 by default) on one model, run one after another in one invocation:

    bp-t1    gradkit train --method bp                       1 process, 1 thread   (the reference)
    bp-tK    gradkit train --method bp --threads K           1 process, K threads  (intra-op parallel)
    ddp-pK   benchmarks/stage-parallel/ddp.py --procs K      K processes x 1 thread, DistributedDataParallel
    bp-wK    gradkit train --method bp --stages K --workers K    synchronous stage pipeline (backward-locked)
    fr-wK    gradkit train --method fr --stages K --workers K    Features Replay, one process per stage
    ddg-wK   gradkit train --method ddg --stages K --workers K   DDG, one process per stage
    (dni-wK  on request with --methods)

Every run is a fresh subprocess with its own run folder under ``runs/bench-stage-parallel/<profile>/
<session>/`` (never reused, never committed); the script reads its ``metrics.jsonl``. The order of the
methods rotates by one with every repeat, so that a drift in the machine's load hits every method.
Children get ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning on cores the
other processes need) and gradkit runs get ``--no-progress``.

Speed is the training throughput gradkit writes (``samples_per_second``: training steps only,
evaluation excluded). With more than one epoch the first is left out as warm-up (it also holds
gradkit's one-off memory measurement step); the steady figure is total samples / total seconds of
the remaining epochs. Time to accuracy is the first ``elapsed_seconds`` (training time only, summed
over epochs) after which ``test_acc`` >= the profile's threshold, so it is known at epoch granularity.

Each run appends one line to ``results/results.jsonl`` (next to this script) with the machine (cpu,
cores, torch, date) and the 1-minute load average before and after it; ``results/report.md`` gets
the tables (per model and method: median samples/s, ratio to bp-t1 and bp-tK, time to threshold).

    python benchmarks/stage-parallel/run.py --profile smoke                    # seconds
    python benchmarks/stage-parallel/run.py --profile quick                    # samples/s, 3 repeats
    python benchmarks/stage-parallel/run.py --profile accuracy                 # time to test acc >= 0.40
    python benchmarks/stage-parallel/run.py --profile quick --dry-run          # print the commands
    python benchmarks/stage-parallel/run.py --profile quick --methods bp-t1,fr-w2 --models resnet20
    python benchmarks/stage-parallel/run.py --report                           # tables from results.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results" / "results.jsonl"
REPORT = HERE / "results" / "report.md"
RUNS = ROOT / "runs" / "bench-stage-parallel"


@dataclasses.dataclass(frozen=True)
class Profile:
    models: tuple[str, ...]
    epochs: int
    limit_train: int | None
    limit_test: int | None
    repeats: int
    threshold: float | None
    """Test accuracy whose first crossing is timed (None: not timed)."""
    data: str = "cifar10"
    note: str = ""


PROFILES = {
    # Throughput: two short epochs (the first is warm-up), three repeats in rotated order.
    "quick": Profile(models=("resnet20", "resnet56"), epochs=2, limit_train=5120, limit_test=1000,
                     repeats=3, threshold=None, note="samples/s of epoch 2 (epoch 1 is warm-up)"),
    # Time to a fixed test accuracy: 5 epochs on 10k images; 0.40 is reached by bp after 3-4 epochs
    # (benchmarks/features-replay: bp 51% after 5 epochs on ResNet-20, 41% after 3 on ResNet-56).
    "accuracy": Profile(models=("resnet20", "resnet56"), epochs=5, limit_train=10_000, limit_test=2000,
                        repeats=1, threshold=0.40, note="time to test_acc >= 0.40"),
    # A test of the script and of every method's command line (seconds per run).
    "smoke": Profile(models=("resnet20",), epochs=2, limit_train=512, limit_test=256, repeats=1,
                     threshold=0.10, note="tiny; numbers only show that the commands work"),
}


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    what: str
    kind: str
    """``gradkit`` (gradkit train) or ``ddp`` (ddp.py)."""
    args: tuple[str, ...]


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024)}

MANUAL_SIZES = {"resnet20": "4,7"}
"""Hand-picked 2-stage splits (``fr-w2-manual``): the fastest of a sweep on the 2-core machine, where the
cost model's profiled split ([3, 8] for ResNet-20) under-estimates how much the last stage slows when
both processes run."""


def methods_for(k: int, worker_threads: int | None) -> dict[str, Method]:
    wt = ("--threads", str(worker_threads)) if worker_threads else ()
    wt_text = f"{worker_threads} thread(s) each" if worker_threads else "default threads (cores / K)"
    pipe = ("--stages", str(k), "--workers", str(k), "--balance", "time", *wt)
    specs = [
        Method("bp-t1", "backprop, 1 process x 1 thread", "gradkit", ("--method", "bp", "--threads", "1")),
        Method(f"bp-t{k}", f"backprop, 1 process x {k} threads", "gradkit",
               ("--method", "bp", "--threads", str(k))),
        Method(f"ddp-p{k}", f"DDP backprop, {k} processes x 1 thread (gloo)", "ddp",
               ("--procs", str(k), "--threads", "1")),
        Method(f"bp-w{k}", f"backprop, synchronous {k}-stage pipeline, {k} processes, {wt_text}", "gradkit",
               ("--method", "bp", *pipe)),
        Method(f"fr-w{k}", f"Features Replay, {k} stages, {k} processes, {wt_text}", "gradkit",
               ("--method", "fr", *pipe)),
        Method(f"fr-w{k}-manual", f"Features Replay, {k} processes, hand-picked split (MANUAL_SIZES)", "gradkit",
               ("--method", "fr", *pipe)),
        Method(f"ddg-w{k}", f"DDG, {k} stages, {k} processes, {wt_text}", "gradkit",
               ("--method", "ddg", *pipe)),
        Method(f"dni-w{k}", f"DNI, {k} stages, {k} processes, {wt_text}", "gradkit",
               ("--method", "dni", *pipe)),
    ]
    return {m.key: m for m in specs}


def default_methods(k: int) -> list[str]:
    return ["bp-t1", f"bp-t{k}", f"ddp-p{k}", f"bp-w{k}", f"fr-w{k}", f"fr-w{k}-manual", f"ddg-w{k}"]


def command(method: Method, model: str, profile: Profile, epochs: int, folder: Path,
            extra: list[str]) -> list[str]:
    common = ["--model", model, "--data", profile.data, "--epochs", str(epochs), "--out", str(folder)]
    if profile.limit_train:
        common += ["--limit-train", str(profile.limit_train)]
    if profile.limit_test:
        common += ["--limit-test", str(profile.limit_test)]
    if method.key.endswith("-manual"):
        if model not in MANUAL_SIZES:
            return []
        common += ["--stage-sizes", MANUAL_SIZES[model]]
    if method.kind == "ddp":
        return [sys.executable, str(HERE / "ddp.py"), *method.args, *common, *extra]
    return [sys.executable, "-m", "gradkit", "train", *method.args, *common, "--no-progress", *extra]


def plan(profile: Profile, models: list[str], keys: list[str], repeats: int) -> list[tuple[int, int, str, str]]:
    """(repeat, position, model, method key) in run order: per repeat the methods rotate by one."""
    out = []
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for model in models:
            for pos, key in enumerate(order):
                out.append((r, pos, model, key))
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "host": platform.node()}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # Every row keeps freed heap memory, as gradkit's stage workers do (gradkit.distributed.context.
    # keep_freed_memory): page faults on re-allocated activations would otherwise slow multi-process rows.
    env.update(MALLOC_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_one(cmd: list[str], folder: Path, timeout: float) -> tuple[int, float, float, str]:
    """Run cmd in its own process group; returns (exit code, wall s, child CPU s, last lines of output)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / (folder.name + ".log")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            rc = 124
        except BaseException:
            _end_group(proc)
            raise
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
    return rc, wall, cpu, tail


def _end_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for one run (the run and its workers), then reap it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def summarise_metrics(folder: Path, threshold: float | None) -> dict[str, Any]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {"epochs_done": 0}
    hist = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not hist:
        return {"epochs_done": 0}
    steady = hist[1:] if len(hist) > 1 else hist
    samples = sum(r["samples_per_second"] * r["epoch_seconds"] for r in steady)
    seconds = sum(r["epoch_seconds"] for r in steady)
    reached = next((r for r in hist if threshold is not None and r["test_acc"] >= threshold), None)
    config = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    return {
        "epochs_done": len(hist),
        "samples_per_second": samples / seconds if seconds > 0 else None,
        "samples_per_second_epochs": [r["samples_per_second"] for r in hist],
        "epoch_seconds": [r["epoch_seconds"] for r in hist],
        "elapsed_seconds": [r["elapsed_seconds"] for r in hist],
        "test_acc": [r["test_acc"] for r in hist],
        "train_loss": [r["train_loss"] for r in hist],
        "final_test_acc": hist[-1]["test_acc"],
        "threshold": threshold,
        "time_to_threshold": reached["elapsed_seconds"] if reached else None,
        "epoch_to_threshold": reached["epoch"] if reached else None,
        "threads": config.get("threads"),
        "stage_sizes": config.get("stage_sizes"),
    }


def benchmark(args: argparse.Namespace, profile: Profile) -> str | None:
    k = args.k
    specs = methods_for(k, args.worker_threads)
    keys = args.methods or default_methods(k)
    unknown = [m for m in keys if m not in specs]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(specs)}")
    models = args.models or list(profile.models)
    repeats = args.repeats or profile.repeats
    epochs = args.epochs or profile.epochs
    threshold = args.threshold if args.threshold is not None else profile.threshold
    session = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = args.runs / args.profile / session
    runs = plan(profile, models, keys, repeats)
    extra = list(args.extra or [])
    if args.dry_run:
        print(f"# profile {args.profile}: {len(runs)} runs, one at a time, env OMP_WAIT_POLICY=PASSIVE")
        for r, _pos, model, key in runs:
            folder = base / model / f"{key}-r{r}"
            print(f"# repeat {r + 1}/{repeats}, {model}, {key}: {specs[key].what}")
            cmd = command(specs[key], model, profile, epochs, folder, extra)
            print("OMP_WAIT_POLICY=PASSIVE " + shlex.join(cmd) if cmd else "# (no hand-picked split for this model)")
        return None
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    print(f"session {session}: {len(runs)} runs, folders under {base}", file=sys.stderr, flush=True)
    for n, (r, pos, model, key) in enumerate(runs, start=1):
        method = specs[key]
        folder = base / model / f"{key}-r{r}"
        cmd = command(method, model, profile, epochs, folder, extra)
        if not cmd:  # e.g. a hand-picked split this model has none of
            continue
        load_before = os.getloadavg()
        print(f"[{n}/{len(runs)}] {model} {key} (repeat {r + 1}, load {load_before[0]:.2f}) ...",
              end=" ", file=sys.stderr, flush=True)
        rc, wall, cpu, tail = run_one(cmd, folder, args.timeout)
        load_after = os.getloadavg()
        row = {
            "session": session, "profile": args.profile,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": model, "method": key, "what": method.what, "k": k, "repeat": r, "position": pos,
            "epochs": epochs, "limit_train": profile.limit_train, "limit_test": profile.limit_test,
            "data": profile.data, "command": shlex.join(cmd), "rc": rc, "wall_seconds": wall,
            "cpu_seconds": cpu, "load_before": load_before, "load_after": load_after,
            "machine": info, "run_dir": str(folder),
        }
        try:
            row.update(summarise_metrics(folder, threshold))
        except (KeyError, TypeError, ValueError) as exc:  # an unexpected metrics.jsonl: keep the row
            row.update(epochs_done=0, metrics_error=f"{type(exc).__name__}: {exc}")
        if rc != 0:
            row["error"] = tail
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        sps = row.get("samples_per_second")
        print(f"rc {rc}, {wall:.0f} s" + (f", {sps:.0f} samples/s" if sps else "")
              + (f", test_acc {row['final_test_acc']:.3f}" if row.get("epochs_done") else "")
              + ("" if rc == 0 else f"\n    {tail.splitlines()[-1] if tail else ''}"),
              file=sys.stderr, flush=True)
    return session


# -- report -----------------------------------------------------------------------------------------

def read_rows() -> list[dict[str, Any]]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _median_sps(by: dict[str, list[dict[str, Any]]], key: str) -> float | None:
    return _median([r["samples_per_second"] for r in by.get(key, [])
                    if r["rc"] == 0 and r.get("samples_per_second")])


def _fmt(x: float | None, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def report(rows: list[dict[str, Any]], which: str) -> str:
    lines = ["# Stage-parallel benchmark: results", "",
             "Written by `benchmarks/stage-parallel/run.py` from `results.jsonl`. Samples/s: median over repeats of "
             "the training throughput (epochs after the first when there are several). Ratios: this method's "
             "median over the median of single-process backprop with 1 thread (`bp-t1`) or K threads (`bp-tK`). "
             "Time to accuracy: training seconds until the first epoch whose test accuracy reaches the threshold, "
             "median over repeats.", ""]
    for profile in [p for p in ("quick", "accuracy", "smoke") if any(r["profile"] == p for r in rows)] + sorted(
            {r["profile"] for r in rows} - set(PROFILES)):
        mine = [r for r in rows if r["profile"] == profile]
        sessions = sorted({r["session"] for r in mine})
        chosen = sessions if which == "all" else [sessions[-1]] if which == "latest" else [which]
        mine = [r for r in mine if r["session"] in chosen]
        if not mine:
            continue
        first = mine[0]
        m = first["machine"]
        loads = [r["load_before"][0] for r in mine] + [r["load_after"][0] for r in mine]
        lines += [f"## Profile `{profile}`", "",
                  f"Session(s) {', '.join(chosen)}; {first['date'][:10]}; {m['cpu']}, {m['cores']} cores, "
                  f"torch {m['torch']}; {first['data']}, {first['limit_train'] or 'all'} training / "
                  f"{first['limit_test'] or 'all'} test images, {first['epochs']} epoch(s), K = {first['k']}; "
                  f"1-minute load average {min(loads):.2f}-{max(loads):.2f} around the runs.", ""]
        k = first["k"]
        for model in dict.fromkeys(r["model"] for r in mine):
            rs = [r for r in mine if r["model"] == model]
            thr = next((r.get("threshold") for r in rs if r.get("threshold") is not None), None)
            by: dict[str, list[dict[str, Any]]] = {}
            for r in rs:
                by.setdefault(r["method"], []).append(r)

            ref1, refk = _median_sps(by, "bp-t1"), _median_sps(by, f"bp-t{k}")
            lines += [f"### {model}", "",
                      "| method | what | runs ok | samples/s (median) | range | vs bp-t1 | vs bp-t"
                      f"{k} | final test acc | time to acc >= {_fmt(thr, '.2f')} (s) | load before |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for key, group in by.items():
                ok = [r for r in group if r["rc"] == 0 and r.get("samples_per_second")]
                sps = [r["samples_per_second"] for r in ok]
                med = _median(sps)
                times = [r["time_to_threshold"] for r in ok]
                reached = [t for t in times if t is not None]
                if thr is None:
                    ttt = "-"
                elif not ok:
                    ttt = "-"
                elif len(reached) < len(times):
                    ttt = f"not reached in {len(times) - len(reached)} of {len(times)}" + (
                        f"; {_median(reached):.1f}" if reached else "")
                else:
                    ttt = f"{_median(reached):.1f}"
                failed = [r for r in group if r["rc"] != 0]
                note = f" ({len(failed)} failed: rc {failed[0]['rc']})" if failed else ""
                lines.append("| " + " | ".join([
                    key, group[0]["what"], f"{len(ok)}/{len(group)}{note}", _fmt(med),
                    f"{min(sps):.0f}-{max(sps):.0f}" if sps else "-",
                    _fmt(med / ref1 if med and ref1 else None, ".2f"),
                    _fmt(med / refk if med and refk else None, ".2f"),
                    _fmt(_median([r["final_test_acc"] for r in ok]), ".3f"), ttt,
                    _fmt(_median([r["load_before"][0] for r in group]), ".2f"),
                ]) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global RESULTS, REPORT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated subset (default: bp-t1,bp-tK,ddp-pK,bp-wK,fr-wK,ddg-wK; also dni-wK)")
    p.add_argument("--models", type=lambda s: [x for x in s.split(",") if x], help="comma-separated models")
    p.add_argument("--repeats", type=int, help="override the profile's repeats")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--threshold", type=float, help="test accuracy to time (override the profile's)")
    p.add_argument("--k", type=int, default=2, help="processes / stages / threads compared (default 2)")
    p.add_argument("--worker-threads", type=int,
                   help="pass --threads N to the --workers runs (default: gradkit's cores / K)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is ended")
    p.add_argument("--runs", type=Path, default=RUNS, help=f"where run folders go (default {RUNS})")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="results file to append to; report.md is written next to it (default results/results.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="print the commands in run order, run nothing")
    p.add_argument("--report", action="store_true", help="only rewrite report.md from results.jsonl")
    p.add_argument("--session", default="latest", help="report: latest (default), all, or a session id")
    p.add_argument("--extra", nargs=argparse.REMAINDER, help="further arguments for every run (last option)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    args.runs = args.runs.resolve()
    RESULTS = args.results.resolve()
    REPORT = RESULTS.parent / "report.md"
    profile = PROFILES[args.profile]
    if not args.report:
        session = benchmark(args, profile)
        if session is None:
            return 0
    rows = read_rows()
    if not rows:
        print(f"no results in {RESULTS}", file=sys.stderr)
        return 1
    text = report(rows, args.session)
    REPORT.write_text(text + "\n")
    print(text)
    print(f"\nresults: {RESULTS}\nreport:  {REPORT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
