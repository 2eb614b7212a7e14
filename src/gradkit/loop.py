"""The training loop: epochs, evaluation, metrics, checkpoints and resume.

``gradkit.train(config)`` runs one :class:`~gradkit.config.TrainConfig` with any registered method.
The loop is deliberately thin (the benchmark in ``benchmarks/overhead`` holds it within 10% of a bare
PyTorch loop): per step it sets the learning rate, calls ``method.step`` and checks the loss.

Run folder layout::

    config.json      the configuration (written when the run starts)
    metrics.jsonl    one JSON object per finished epoch
    checkpoint.pt    the last good state, replaced atomically after every epoch and on Ctrl-C
    model.pt         the final model weights (``model.state_dict()``), when the run completes
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gradkit import distributed as _distributed
from gradkit import methods as _methods
from gradkit.checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json_atomic
from gradkit.compress import Activations
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, Dataset, load_dataset
from gradkit.direction import measure_direction
from gradkit.errors import ConfigError, GradkitError, TrainingDiverged
from gradkit.memory import MemoryReport, measure_step
from gradkit.methods import Method
from gradkit.models import build_model
from gradkit.stages import check_stage_sizes, split

PIPELINED = ("fr", "ddg", "dni")
"""Methods whose time-balanced split follows their pipeline cost model (gradkit.distributed.cost_model)."""

__all__ = ["train", "evaluate", "RunResult", "RunInterrupted", "StepCallback", "WorkerFailed"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
MODEL = "model.pt"
_FORMAT = 1

StepCallback = Callable[[int, int, float], None]
"""Called after every step with (epoch, step within epoch, loss); may raise KeyboardInterrupt."""


class WorkerFailed(GradkitError):
    """A worker process of a multi-process run failed; its own message was printed by it."""

    exit_code = 1


class RunInterrupted(GradkitError):
    """Training stopped on Ctrl-C; a checkpoint of the exact position was saved."""

    exit_code = 130


@dataclass
class RunResult:
    """What a finished run produced."""

    config: TrainConfig
    history: list[dict[str, Any]]
    """The per-epoch metrics, as in ``metrics.jsonl``."""
    memory: MemoryReport | None
    """Activation memory of the first training step (None when resumed past it)."""
    stage_sizes: list[int]
    """Blocks per stage."""
    method: Method | None = field(repr=False)
    """The trained method; None in the process that launched workers (each worker holds one stage)."""
    model: nn.Module | None = field(repr=False)
    """The trained model; None in the launching process (the weights are in ``model.pt``)."""

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.history[-1] if self.history else {}


@torch.no_grad()
def evaluate(method: Method, loader: BatchLoader) -> tuple[float, float]:
    """Mean loss and accuracy (a fraction) of the current weights on ``loader``."""
    was_training = method.stages[0].training
    method.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader.epoch(0):
        out = method.predict(x)
        loss_sum += method.loss_fn(out, y).item() * y.numel()
        correct += int((out.argmax(dim=1) == y).sum().item())
        count += y.numel()
    if was_training:
        method.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
    return device


@contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        stop.set()
        # A second Ctrl-C gets the default behaviour: stop now, keeping the last saved checkpoint.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


_CURVE_POINTS_PER_EPOCH = 10


@dataclass
class _EpochTally:
    """Running sums of the epoch in progress (saved in checkpoints so a resumed epoch adds up)."""

    loss_sum: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    window_loss: float = 0.0
    window_samples: int = 0
    curve: list[list[float]] = field(default_factory=list)
    """[epoch progress, training seconds since the run began, mean train loss of the window] points,
    about ten per epoch, so short runs still plot as curves."""
    direction: list[list[float]] = field(default_factory=list)
    """[σ, cosine] of the steps measured with ``measure_direction``."""

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.samples += n
        self.window_loss += loss * n
        self.window_samples += n

    def close_window(self, progress: float, elapsed_total: float) -> None:
        if self.window_samples:
            self.curve.append([progress, elapsed_total, self.window_loss / self.window_samples])
        self.window_loss, self.window_samples = 0.0, 0

    def state(self) -> dict[str, Any]:
        return dict(vars(self))

    def record(self, *, epoch: int, test_loss: float, test_acc: float, eval_seconds: float,
               elapsed_before: float, lr: float, method: str) -> dict[str, Any]:
        """The metrics.jsonl line of the finished epoch ``epoch`` (1-based)."""
        seconds, samples = self.seconds, self.samples
        return {
            "epoch": epoch,
            "train_loss": self.loss_sum / max(samples, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else 0.0,
            "samples": samples,
            "eval_seconds": eval_seconds,
            "elapsed_seconds": elapsed_before + seconds,
            "lr": lr,
            "method": method,
            "train_curve": self.curve,
        }


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _rewrite_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in history).encode()
    atomic_write(path, lambda f: f.write(data))


class _Run:
    """The state of one run while it trains; ``train`` is its only user."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None) -> None:
        self.config = config
        self.out = config.out_path
        self.device = _resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)

        saved = self._load_saved_state()
        if dataset is None:
            dataset = load_dataset(
                config.data,
                config.data_dir,
                download=config.download,
                limit_train=config.limit_train,
                limit_test=config.limit_test,
                seed=config.seed,
            )
        self.dataset = dataset
        info = dataset.info
        self.train_loader = BatchLoader(
            dataset.train_x, dataset.train_y, info, config.batch_size,
            train=True, seed=config.seed, device=self.device,
        )
        self.test_loader = BatchLoader(
            dataset.test_x, dataset.test_y, info, config.eval_batch_size,
            train=False, seed=config.seed, device=self.device,
        )

        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, info.input_shape, info.num_classes, **dataset.model_args
        ).to(self.device)
        self.stage_sizes = saved["stage_sizes"] if saved else self._choose_split()
        stages = split(self.model, sizes=self.stage_sizes)
        self.method = _methods.build(
            config.method,
            stages,
            optimizer=config.optimizer_config().factory(),
            **config.method_options,
        )
        # --activations: low-bit copies of saved activations inside every step (exact: untouched).
        self.activations = Activations(self.model, config.activations, group_size=config.activation_group_size)
        self.activations.attach(self.method)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.tally = _EpochTally()
        self.history: list[dict[str, Any]] = []
        self.memory: MemoryReport | None = None
        self.activation_bytes: int | None = None
        self.stage_memory: list[dict[str, int]] | None = None
        if saved:
            self._restore(saved)

    # -- set-up -----------------------------------------------------------------------------------
    def _load_saved_state(self) -> dict[str, Any] | None:
        if self.out is None:
            return None
        ckpt = self.out / CHECKPOINT
        if not self.config.resume:
            if ckpt.exists():
                raise ConfigError(
                    f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
                )
            return None
        saved = load_checkpoint(ckpt)
        if saved.get("format") != _FORMAT:
            raise ConfigError(f"{ckpt} was written by an incompatible gradkit version")
        conflicts = self.config.resume_conflicts(TrainConfig.from_dict(saved["config"]))
        if conflicts:
            raise ConfigError(
                f"--resume with different options than the run in {self.out}: {'; '.join(conflicts)}; "
                "use the original options (only --epochs, --threads and --device may change)"
            )
        return saved

    def _choose_split(self) -> list[int]:
        k = self.config.stages
        blocks = len(self.model)
        if k > blocks:
            raise ConfigError(
                f"--stages {k} is more than the {blocks} blocks of {self.config.model}; use --stages <= {blocks}"
            )
        if self.config.stage_sizes:
            return check_stage_sizes(self.config, blocks)
        if k == 1:
            return [blocks]
        sample = None
        if self.config.balance == "time":
            x, _ = next(iter(self.train_loader.epoch(0)))
            sample = x
        # With time balancing, a pipelined method's cost model picks the cut (FR's early stages
        # pay an extra replay forward); other methods balance plain forward+backward time.
        method = self.config.method if sample is not None and self.config.method in PIPELINED else None
        stages = split(self.model, k, balance=self.config.balance, sample=sample, method=method)
        return [len(s) for s in stages]

    def _restore(self, saved: dict[str, Any]) -> None:
        self.method.load_state_dict(saved["method_state"])
        self.epoch = saved["epoch"]
        self.step_in_epoch = saved["step_in_epoch"]
        self.global_step = saved["global_step"]
        self.tally = _EpochTally(**saved["tally"])
        self.history = list(saved["history"])
        self.activation_bytes = saved.get("activation_bytes")
        self.stage_memory = saved.get("stage_memory")
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        # The checkpoint is the truth: metrics lines written after it was saved are dropped.
        assert self.out is not None
        _rewrite_metrics(self.out / METRICS, self.history)
        if self.epoch >= self.config.epochs:
            log.info("the run in %s already finished its %d epochs; pass a larger --epochs to train on",
                     self.out, self.epoch)
        else:
            log.info("resuming %s at epoch %d step %d", self.out, self.epoch + 1, self.step_in_epoch)

    # -- persistence ------------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        if self.out is None:
            return None
        state = {
            "format": _FORMAT,
            "config": self.config.to_dict(),
            "stage_sizes": self.stage_sizes,
            "method_state": self.method.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "tally": self.tally.state(),
            "history": self.history,
            "activation_bytes": self.activation_bytes,
            "stage_memory": self.stage_memory,
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        return save_checkpoint(self.out / CHECKPOINT, state)

    # -- training ---------------------------------------------------------------------------------
    def run(self, on_step: StepCallback | None) -> RunResult:
        config = self.config
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / CONFIG, {**config.to_dict(), "stage_sizes": self.stage_sizes})
        schedule = config.lr_schedule()
        steps_per_epoch = len(self.train_loader)
        self.method.train()
        with _stop_on_sigint() as stop:
            while self.epoch < config.epochs:
                self._train_epoch(schedule, steps_per_epoch, stop, on_step)
                self._end_epoch()
        self.method.flush()
        if self.out is not None:
            atomic_write(self.out / MODEL, lambda f: torch.save(self.model.state_dict(), f))
        return RunResult(config, self.history, self.memory, self.stage_sizes, self.method, self.model)

    def _train_epoch(
        self, schedule, steps_per_epoch: int, stop: threading.Event, on_step: StepCallback | None
    ) -> None:
        config, epoch = self.config, self.epoch
        last_acc = self.history[-1]["test_acc"] if self.history else None
        bar = tqdm(
            total=steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"{config.method} epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            dynamic_ncols=True,
        )
        tally = self.tally
        start = time.perf_counter() - tally.seconds
        run_seconds_before = self.history[-1]["elapsed_seconds"] if self.history else 0.0
        window = max(1, steps_per_epoch // _CURVE_POINTS_PER_EPOCH)
        # Memory is measured once, at the first step where every pipeline stage is busy.
        memory_step = min(self.method.steady_step, steps_per_epoch * config.epochs - 1)
        every = config.measure_direction
        for x, y in self.train_loader.epoch(epoch, start_step=self.step_in_epoch):
            progress = epoch + self.step_in_epoch / steps_per_epoch
            self.method.set_lr_factor(schedule.factor(progress, total_epochs=config.epochs))
            if self.global_step == memory_step:
                loss, self.memory = measure_step(self.method, x, y)
                self.activation_bytes = self.memory.activation_bytes
                self.stage_memory = [s.to_dict() for s in self.memory.stages]
            elif every is not None and self.global_step % every == 0:
                loss, sample = measure_direction(self.method, x, y)
                if sample is not None:
                    tally.direction.append([sample.sigma, sample.cosine])
            else:
                loss = self.method.step(x, y)
            if not math.isfinite(loss):
                bar.close()
                self._diverged(loss)
            self.step_in_epoch += 1
            self.global_step += 1
            tally.add(loss, y.shape[0])
            elapsed = time.perf_counter() - start
            tally.seconds = elapsed
            if self.step_in_epoch % window == 0 or self.step_in_epoch == steps_per_epoch:
                tally.close_window(epoch + self.step_in_epoch / steps_per_epoch, run_seconds_before + elapsed)
            bar.update(1)
            if config.progress and (self.step_in_epoch % 10 == 0 or self.step_in_epoch == steps_per_epoch):
                postfix = {"loss": f"{loss:.4f}", "samples/s": f"{tally.samples / elapsed:.0f}"}
                if last_acc is not None:
                    postfix["test_acc"] = f"{last_acc:.4f}"
                bar.set_postfix(postfix, refresh=False)
            if on_step is not None:
                on_step(epoch, self.step_in_epoch, loss)
            if stop.is_set() and self.step_in_epoch < steps_per_epoch:
                bar.close()
                self._interrupted()
        bar.close()

    def _end_epoch(self) -> None:
        eval_start = time.perf_counter()
        test_loss, test_acc = evaluate(self.method, self.test_loader)
        tally = self.tally
        record = tally.record(
            epoch=self.epoch + 1, test_loss=test_loss, test_acc=test_acc,
            eval_seconds=time.perf_counter() - eval_start,
            elapsed_before=self.history[-1]["elapsed_seconds"] if self.history else 0.0,
            lr=self.method.optimizers[0].param_groups[0]["lr"], method=self.config.method,
        )
        record.update(activation_bytes=self.activation_bytes, stage_memory=self.stage_memory)
        if self.config.measure_direction is not None:
            sigmas = [d[0] for d in tally.direction]
            cosines = [d[1] for d in tally.direction]
            record.update(
                direction_samples=len(sigmas),
                direction_sigma_mean=sum(sigmas) / len(sigmas) if sigmas else None,
                direction_sigma_min=min(sigmas) if sigmas else None,
                direction_cosine_mean=sum(cosines) / len(cosines) if cosines else None,
                direction_cosine_min=min(cosines) if cosines else None,
            )
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.tally = _EpochTally()
        # Checkpoint first: metrics.jsonl is rebuilt from the checkpoint on resume.
        self.checkpoint()
        if self.out is not None:
            _append_metrics(self.out / METRICS, record)
        log.info(
            "epoch %d: train_loss %.4f test_loss %.4f test_acc %.4f (%.1fs)",
            record["epoch"], record["train_loss"], test_loss, test_acc, record["epoch_seconds"],
        )

    def _diverged(self, loss: float) -> None:
        where = f"epoch {self.epoch + 1} step {self.step_in_epoch + 1}"
        if self.out is not None and (self.out / CHECKPOINT).exists():
            kept = f"the last good checkpoint {self.out / CHECKPOINT} (after epoch {self.epoch}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        raise TrainingDiverged(f"loss became {loss} at {where}; {kept}; try a lower --lr", where=where)

    def _interrupted(self) -> None:
        path = self.checkpoint()
        where = f"epoch {self.epoch + 1} step {self.step_in_epoch}"
        if path is None:
            raise RunInterrupted(f"interrupted at {where}; nothing saved (no --out)")
        raise RunInterrupted(f"interrupted at {where}; checkpoint saved to {path}; continue with --resume")


def _launch_workers(config: TrainConfig) -> RunResult:
    """Train in ``config.workers`` processes (one stage each) and read back what they wrote."""
    from gradkit.distributed.launch import launch

    code = launch(config, config.workers or 1)
    # The workers printed what happened (one line each): the CLI does not repeat it.
    error: GradkitError | None = None
    if code == RunInterrupted.exit_code:
        error = RunInterrupted(f"interrupted; the checkpoint in {config.out} is kept; continue with --resume")
    elif code != 0:
        error = WorkerFailed(f"a worker failed (exit code {code}); the last good checkpoint in {config.out} is kept")
        error.exit_code = code
    if error is not None:
        error.already_reported = True  # type: ignore[attr-defined]
        raise error
    out = config.out_path
    assert out is not None
    history = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    saved = json.loads((out / CONFIG).read_text())
    return RunResult(config, history, None, list(saved["stage_sizes"]), None, None)


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    on_step: StepCallback | None = None,
) -> RunResult:
    """Train ``config.model`` on ``config.data`` with ``config.method``.

    Example:
        >>> result = gradkit.train(TrainConfig(method="bp", model="mlp", data="digits", epochs=5))
        >>> result.final["test_acc"]
        0.97

    Args:
        config: the run's configuration.
        dataset: an already loaded dataset to use instead of loading ``config.data``.
        on_step: called after every step with (epoch, step, loss).

    Returns:
        The per-epoch history, the first step's memory report, the trained method and model.

    Raises:
        ConfigError, DataError: bad options or data (nothing is trained).
        TrainingDiverged: the loss became NaN or infinite; the last good checkpoint is kept.
        RunInterrupted: Ctrl-C; a checkpoint of the exact position was saved first.
    """
    if _distributed.in_worker_process() and int(os.environ["WORLD_SIZE"]) > 1:
        if config.workers is not None and config.workers != int(os.environ["WORLD_SIZE"]):
            raise ConfigError(f"--workers {config.workers} but this process is one of "
                              f"{os.environ['WORLD_SIZE']} ranks; leave --workers out under torchrun")
        if dataset is not None:
            raise ConfigError("a multi-process run loads its data on rank 0; pass data by name, not dataset=")
        from gradkit.distributed.run import train_worker  # imports this module: late

        return train_worker(config, on_step=on_step)
    if config.workers is not None and config.workers > 1:
        if dataset is not None or on_step is not None:
            raise ConfigError("with workers > 1 the steps run in other processes; dataset= and on_step= "
                              "cannot be passed to them")
        return _launch_workers(config)
    run = _Run(config, dataset)
    try:
        return run.run(on_step)
    except KeyboardInterrupt:
        # A KeyboardInterrupt raised inside a step (second Ctrl-C, or a callback) leaves that step
        # half done, so it is not saved: the checkpoint of the last finished epoch stays.
        raise RunInterrupted(
            f"interrupted at epoch {run.epoch + 1} step {run.step_in_epoch}; "
            + (
                f"the last checkpoint in {run.out} is kept; continue with --resume"
                if run.out is not None and (run.out / CHECKPOINT).exists()
                else "no checkpoint had been written yet"
            )
        ) from None
