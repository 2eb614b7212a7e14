"""The training loop: epochs, steps, evaluation, metrics, checkpoints, stop requests and divergence.

There is one loop, :class:`Trainer`, for every way gradkit trains; a :class:`~gradkit.backend.Backend`
answers what differs (this process, or one process per stage). The loop is deliberately thin (the
benchmark in ``benchmarks/overhead`` holds it within 10% of a bare PyTorch loop): per step it sets
the learning rate, runs the backend's step and checks the loss. The run folder's layout is in
:mod:`gradkit.run_folder`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from gradkit.backend import Backend, evaluate
from gradkit.config import TrainConfig
from gradkit.errors import RunInterrupted, TrainingDiverged
from gradkit.memory import MemoryReport
from gradkit.methods import Method
from gradkit.optim import LRSchedule
from gradkit.signals import stop_requests
from gradkit.tally import CURVE_POINTS_PER_EPOCH, EpochTally

__all__ = ["Trainer", "RunResult", "StepCallback", "evaluate"]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]
"""Called after every step with (epoch, step within epoch, loss); may raise KeyboardInterrupt."""


@dataclass
class RunResult:
    """What a finished run produced."""

    config: TrainConfig
    history: list[dict[str, Any]]
    """The per-epoch metrics, as in ``metrics.jsonl``."""
    memory: MemoryReport | None
    """Activation memory of the first training step (None when resumed past it, or with workers)."""
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


class Trainer:
    """Runs a :class:`~gradkit.backend.Backend` through its epochs; ``gradkit.train`` builds one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.config
        self.progress = backend.progress
        p = self.progress
        if backend.reports and (p.epoch or p.step_in_epoch):
            if p.epoch >= self.config.epochs:
                log.info("the run in %s already finished its %d epochs; pass a larger --epochs to train on",
                         backend.folder, p.epoch)
            else:
                log.info("resuming %s at epoch %d step %d", backend.folder, p.epoch + 1, p.step_in_epoch)

    def run(self, on_step: StepCallback | None = None) -> RunResult:
        """Train the remaining epochs and finish; see :func:`gradkit.train` for what it raises."""
        b, config = self.backend, self.config
        if b.reports and b.folder is not None:
            b.folder.prepare()
            if self.progress.epoch < config.epochs:  # a finished run's config.json stays as it was
                b.folder.write_config(self._config_record())
        schedule = config.learning_rate_schedule()
        b.method.train()
        with stop_requests() as stop:
            while self.progress.epoch < config.epochs:
                self._train_epoch(schedule, stop, on_step)
                self._end_epoch()
        b.finish()
        return RunResult(config, self.progress.history, b.memory, b.stage_sizes, b.method, b.model)

    def _config_record(self) -> dict[str, Any]:
        """``config.json``: the configuration, plus every optimizer change a ``--resume`` made."""
        b, p = self.backend, self.progress
        assert b.folder is not None
        record = b.config_record()
        earlier = (b.folder.read_config() or {}).get("resume_changes", []) if b.config.resume else []
        # Changes made at or after the restored position were rolled back with it (a diverged attempt).
        earlier = [c for c in earlier if c.get("global_step", 0) < p.global_step]
        if b.resume_changes:
            earlier = [*earlier, {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch,
                                  "global_step": p.global_step, "changes": b.resume_changes}]
        if earlier:
            record["resume_changes"] = earlier
        return record

    def _train_epoch(self, schedule: LRSchedule, stop: threading.Event, on_step: StepCallback | None) -> None:
        b, config, p = self.backend, self.config, self.progress
        epoch, steps = p.epoch, b.steps_per_epoch
        score_name = _headline_score(b.task)
        last_score = p.history[-1].get(score_name) if p.history else None
        bar = tqdm(total=steps, initial=p.step_in_epoch, desc=f"{b.label} epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and b.holds_loss), leave=False, dynamic_ncols=True)
        tally = p.tally
        start = time.perf_counter() - tally.seconds
        run_seconds_before = p.elapsed_before_epoch
        window = max(1, steps // CURVE_POINTS_PER_EPOCH)
        for x, y, n in b.batches(epoch, p.step_in_epoch):
            if b.stop_agreed(stop):
                bar.close()
                self._interrupted()
            b.method.set_lr_factor(schedule.factor(epoch + p.step_in_epoch / steps, total_epochs=config.epochs,
                                                  steps_per_epoch=steps))
            loss = b.train_step(x, y)
            p.step_in_epoch += 1
            p.global_step += 1
            if loss is None:  # a stage process that does not compute the loss
                continue
            if not math.isfinite(loss):
                bar.close()
                self._diverged(loss)
            tally.add(loss, n)
            elapsed = time.perf_counter() - start
            tally.seconds = elapsed
            if p.step_in_epoch % window == 0 or p.step_in_epoch == steps:
                tally.close_window(epoch + p.step_in_epoch / steps, run_seconds_before + elapsed)
            bar.update(1)
            if config.progress and (p.step_in_epoch % 10 == 0 or p.step_in_epoch == steps):
                postfix = {"loss": f"{loss:.4f}", "samples/s": f"{tally.samples / elapsed:.0f}"}
                if last_score is not None:
                    postfix[score_name] = f"{last_score:.4f}"
                bar.set_postfix(postfix, refresh=False)
            if on_step is not None:
                on_step(epoch, p.step_in_epoch, loss)
        bar.close()

    def _end_epoch(self) -> None:
        b, p = self.backend, self.progress
        eval_start = time.perf_counter()
        scores = b.evaluate()
        tally = b.shared_tally(p.tally)
        extras = b.record_extras()  # in every process: a backend may gather them from all
        record = None
        if scores is not None:
            test_loss, test_acc = scores
            record = tally.record(
                epoch=p.epoch + 1, test_loss=test_loss, test_acc=test_acc,
                eval_seconds=time.perf_counter() - eval_start, elapsed_before=p.elapsed_before_epoch,
                lr=b.method.optimizers[0].param_groups[0]["lr"], method=self.config.method,
            )
            if b.task == "next-token":  # the per-token loss in bits: bits per character for text
                record["test_bpc"] = test_loss / math.log(2)
            record.update(extras)
            if self.config.measure_direction is not None:
                record.update(tally.direction_summary())
            if p.changes:
                record["changes"] = p.changes
        record = b.shared_record(record)
        p.changes = {}
        p.history.append(record)
        p.epoch += 1
        p.step_in_epoch = 0
        p.tally = EpochTally()
        # Checkpoint first: metrics.jsonl is rebuilt from the checkpoint on resume.
        b.checkpoint()
        if b.reports:
            if b.folder is not None:
                b.folder.append_metrics(record)
            score = _headline_score(b.task)
            log.info("epoch %d: train_loss %.4f test_loss %.4f %s %.4f (%.1fs)", record["epoch"],
                     record["train_loss"], record["test_loss"], score, record[score], record["epoch_seconds"])

    def _diverged(self, loss: float) -> None:
        b, p = self.backend, self.progress
        where = f"epoch {p.epoch + 1} step {p.step_in_epoch}"
        advice = "try a lower --lr"
        if b.folder is not None:
            kept = b.folder.describe_kept_checkpoint(multi_process=b.multi_process)
            if b.folder.verified_checkpoint(multi_process=b.multi_process) is not None:
                advice = "continue from it with --resume and a lower --lr"
        else:
            kept = "no checkpoint had been written yet"
        raise TrainingDiverged(f"loss became {loss} at {where}; {kept}; {advice}", where=where)

    def _interrupted(self) -> None:
        path = self.backend.checkpoint()
        where = f"epoch {self.progress.epoch + 1} step {self.progress.step_in_epoch}"
        if path is None:
            raise RunInterrupted(f"interrupted at {where}; nothing saved (no --out)")
        raise RunInterrupted(f"interrupted at {where}; checkpoint saved to {path}; continue with --resume")


def _headline_score(task: str) -> str:
    """The test figure shown beside the loss: accuracy, or bits per character for a language model."""
    return "test_bpc" if task == "next-token" else "test_acc"
