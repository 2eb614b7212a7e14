"""Data-parallel backprop baseline: torch DistributedDataParallel on gloo, K CPU processes.

Trains the same model as ``gradkit train --method bp`` (``gradkit.models.build_model``, seeded as
gradkit seeds it), on the same batches: every rank iterates gradkit's own ``BatchLoader`` with the same
seed (same shuffle, same crop/flip) and takes its contiguous 1/K slice of each global batch, so the
global batch is ``--batch-size`` (128) and each rank computes ``128/K`` of it. Optimizer and schedule
come from ``gradkit.TrainConfig`` (SGD, Nesterov momentum 0.9, lr 0.05, weight decay 5e-4, cosine,
set per step exactly as gradkit's loop sets it). DDP averages the gradients over ranks; BatchNorm is
per rank (plain ``BatchNorm2d``, no SyncBN, as usual for DDP), and rank 0's running statistics are
broadcast to the others at every forward (DDP's ``broadcast_buffers``).

After every epoch rank 0 evaluates test accuracy with gradkit's test loader (the other ranks wait at
a barrier) and appends a line to ``<out>/metrics.jsonl`` with the keys of gradkit's own:
``epoch, train_loss, test_loss, test_acc, epoch_seconds, samples_per_second, eval_seconds,
elapsed_seconds, lr, method, train_curve`` (``elapsed_seconds``: training time only, summed over
epochs, as in gradkit). ``config.json`` holds the configuration and ``model.pt`` the final weights.

    python benchmarks/stage-parallel/ddp.py --model resnet20 --data cifar10 --procs 2 --threads 1 \\
        --epochs 1 --limit-train 5120 --limit-test 1000 --out runs/ddp-r20

Processes: the parent starts K ranks (``multiprocessing`` spawn), waits for them, and ends all of them
when one fails, on Ctrl-C or SIGTERM; each rank also dies with its parent (``PR_SET_PDEATHSIG``), so
no rank outlives the command. Exit code 0 when every rank finished, else non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

_CURVE_POINTS_PER_EPOCH = 10  # as gradkit.tally.CURVE_POINTS_PER_EPOCH


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes <out>/config.json, <out>/metrics.jsonl (one line per epoch) and <out>/model.pt.",
    )
    p.add_argument("--model", default="resnet20", help="a gradkit model name (default: resnet20)")
    p.add_argument("--data", default="cifar10", help="a gradkit dataset name (default: cifar10)")
    p.add_argument("--data-dir", help="folder searched first for the data")
    p.add_argument("--procs", "--world-size", dest="procs", type=int, default=2,
                   help="data-parallel processes K (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (default 128 = 128/K per rank)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=None, help="default: gradkit's (0.05 for SGD)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "multistep", "constant"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, help="stratified subset of N training examples")
    p.add_argument("--limit-test", type=int, help="stratified subset of N test examples")
    p.add_argument("--out", required=True, help="run folder (must not hold a finished run)")
    p.add_argument("--port", type=int, default=0, help="rendezvous port on 127.0.0.1 (default: a free one)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective may wait before the run fails (default 600)")
    return p


def _train_config(args: argparse.Namespace):
    import gradkit

    return gradkit.TrainConfig(
        method="bp", model=args.model, data=args.data, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, optimizer="sgd", lr=args.lr,
        momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay, lr_schedule=args.schedule,
        seed=args.seed, threads=args.threads, device="cpu", limit_train=args.limit_train,
        limit_test=args.limit_test, progress=False, out=args.out,
    )


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent exits (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _slices(n: int, k: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [lo, hi) parts of a batch of n examples (torch.tensor_split's rule)."""
    q, r = divmod(n, k)
    bounds, lo = [], 0
    for i in range(k):
        hi = lo + q + (1 if i < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the ranks
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradkit.data import BatchLoader, load_dataset
    from gradkit.models import build_model

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    k = args.procs
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        config = _train_config(args)
        out = Path(args.out)
        dataset = load_dataset(args.data, args.data_dir, limit_train=args.limit_train,
                               limit_test=args.limit_test, seed=args.seed)
        info = dataset.info
        train_loader = BatchLoader(dataset.train_x, dataset.train_y, info, args.batch_size,
                                   train=True, seed=args.seed)
        test_loader = BatchLoader(dataset.test_x, dataset.test_y, info, args.eval_batch_size,
                                  train=False, seed=args.seed)
        torch.manual_seed(args.seed)  # as gradkit's loop does before build_model
        model = build_model(args.model, info.input_shape, info.num_classes, **dataset.model_args)
        ddp = DDP(model)  # broadcast_buffers defaults to True
        optimizer = config.optimizer_config().factory()(ddp.parameters())
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        schedule = config.learning_rate_schedule()
        loss_fn = torch.nn.functional.cross_entropy
        steps_per_epoch = len(train_loader)
        window = max(1, steps_per_epoch // _CURVE_POINTS_PER_EPOCH)
        lo, hi = _slices(args.batch_size, k)[rank]

        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if (out / "metrics.jsonl").exists():
                raise SystemExit(f"{out} already holds a run; choose another --out")
            cfg = {**config.to_dict(), "method": "ddp", "procs": k, "threads_per_process": args.threads,
                   "backend": "gloo", "stage_sizes": [len(model)]}
            (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        elapsed_total = 0.0
        for epoch in range(args.epochs):
            ddp.train()
            dist.barrier()
            start = time.perf_counter()
            loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of loss * n, n] of this rank
            window_loss, window_n, curve = 0.0, 0, []
            for step, (x, y) in enumerate(train_loader.epoch(epoch)):
                parts = _slices(len(y), k)
                if any(b - a == 0 for a, b in parts):
                    continue  # a last batch smaller than K: every rank skips it alike
                a, b = parts[rank]
                xr, yr = x[a:b], y[a:b]
                factor = schedule.factor(epoch + step / steps_per_epoch, total_epochs=args.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                loss = loss_fn(ddp(xr), yr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces (averages) gradients here
                optimizer.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at epoch {epoch + 1} step {step + 1}")
                loss_sum[0] += lv * len(yr)
                loss_sum[1] += len(yr)
                window_loss += lv * len(yr)
                window_n += len(yr)
                if (step + 1) % window == 0 or step + 1 == steps_per_epoch:
                    if window_n:
                        curve.append([epoch + (step + 1) / steps_per_epoch,
                                      elapsed_total + time.perf_counter() - start, window_loss / window_n])
                    window_loss, window_n = 0.0, 0
            dist.all_reduce(loss_sum)  # also waits for the slowest rank: the epoch ends when all did
            seconds = time.perf_counter() - start
            elapsed_total += seconds
            samples = int(loss_sum[1])
            eval_start = time.perf_counter()
            if rank == 0:
                ddp.eval()
                test_loss, test_acc = _evaluate(model, test_loader, loss_fn)
                record = {
                    "epoch": epoch + 1,
                    "train_loss": float(loss_sum[0] / max(samples, 1)),
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "epoch_seconds": seconds,
                    "samples_per_second": samples / seconds if seconds > 0 else 0.0,
                    "eval_seconds": time.perf_counter() - eval_start,
                    "elapsed_seconds": elapsed_total,
                    "lr": optimizer.param_groups[0]["lr"],
                    "activation_bytes": None,
                    "stage_memory": None,
                    "method": "ddp",
                    "procs": k,
                    "threads_per_process": args.threads,
                    "train_curve": curve,
                }
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"epoch {epoch + 1}: train_loss {record['train_loss']:.4f} test_acc {test_acc:.4f} "
                      f"{record['samples_per_second']:.0f} samples/s ({seconds:.1f} s)", file=sys.stderr, flush=True)
            dist.barrier()
        if rank == 0:
            torch.save(model.state_dict(), out / "model.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _evaluate(model, loader, loss_fn) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (gradkit.evaluate's rule)."""
    import torch

    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader.epoch(0):
            out = model(x)
            loss_sum += loss_fn(out, y).item() * y.numel()
            correct += int((out.argmax(dim=1) == y).sum().item())
            count += y.numel()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.procs < 1 or args.threads < 1:
        print("--procs and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.batch_size < args.procs:
        print(f"--batch-size {args.batch_size} is smaller than --procs {args.procs}", file=sys.stderr)
        return 2
    if (Path(args.out) / "metrics.jsonl").exists():
        print(f"{args.out} already holds a run; choose another --out", file=sys.stderr)
        return 2
    _train_config(args)  # bad options fail here, before any process starts
    # Children inherit these before torch is imported in them.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = args.port or _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, port), name=f"ddp-rank{r}") for r in range(args.procs)]
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        failed = None
        while True:
            alive = [p for p in procs if p.is_alive()]
            bad = [p for p in procs if p.exitcode not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if not alive or stopping:
                break
            alive[0].join(timeout=0.5)
        if failed is not None or stopping:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # whatever happened above, leave no rank behind
            if p.is_alive():
                p.kill()
                p.join()
        for s, h in old.items():
            signal.signal(s, h)
    if stopping:
        print("interrupted; all ranks ended", file=sys.stderr)
        return 130
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        print(f"a rank failed (exit codes {codes}); all ranks ended", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
