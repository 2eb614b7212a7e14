"""Where a run's steps execute: the questions the training loop asks, and the single-process answers.

:class:`gradkit.loop.Trainer` is the one training loop (epochs, steps, learning-rate schedule, loss
tally, progress bar, divergence, stop requests, epoch records, checkpoints). What differs between
training in this process and training with one process per stage (``--workers`` or torchrun,
:mod:`gradkit.distributed.backend`) is answered by a :class:`Backend`: where the batches come from,
who sees the loss, how a stop is agreed, how weights are gathered for evaluation, and how a
checkpoint is written and read back.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradkit.compress import Activations
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, Dataset, DatasetInfo, data_label, load_dataset
from gradkit.devices import fork_rng
from gradkit.direction import measure_direction
from gradkit.errors import ConfigError, GradkitError
from gradkit.memory import MemoryReport, measure_step
from gradkit.methods import METHODS, Method, build, stage_parallel_class
from gradkit.models import build_model, model_label
from gradkit.precision import Precision
from gradkit.run_folder import RunFolder
from gradkit.stages import choose_sizes, split
from gradkit.tally import EpochTally

__all__ = ["Backend", "LocalBackend", "Progress", "Batch", "evaluate", "build_run_model", "resolve_device"]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor | None, torch.Tensor | None, int]
"""(inputs, targets, batch size); inputs and targets are None on ranks that do not load data."""


@dataclass
class Progress:
    """How far a run is: saved in every checkpoint, restored on ``--resume``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    tally: EpochTally = field(default_factory=EpochTally)
    history: list[dict[str, Any]] = field(default_factory=list)
    """The per-epoch records, as in ``metrics.jsonl``."""
    changes: dict[str, list[Any]] = field(default_factory=dict)
    """Optimizer settings ``--resume`` changed since the last epoch record (``{name: [old, new]}``);
    the next epoch record carries them as ``changes``."""

    def add_changes(self, changes: dict[str, list[Any]]) -> None:
        for name, (old, new) in changes.items():
            first = self.changes.get(name, [old, new])[0]
            if first == new:
                self.changes.pop(name, None)
            else:
                self.changes[name] = [first, new]

    @property
    def elapsed_before_epoch(self) -> float:
        """Training seconds of the finished epochs."""
        return self.history[-1]["elapsed_seconds"] if self.history else 0.0


@torch.no_grad()
def evaluate(method: Method, loader: BatchLoader) -> tuple[float, float]:
    """Mean loss and accuracy (a fraction) of the current weights on ``loader``.

    For next-token outputs ``(N, T, V)`` both are per token: the mean loss over every token and the
    fraction of tokens predicted right.
    """
    was_training = method.stages[0].training
    method.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader.epoch(0):
        out = method.predict(x)
        loss_sum += method.loss_fn(out, y).item() * y.numel()
        correct += int((out.argmax(dim=-1 if out.dim() == 3 else 1) == y).sum().item())
        count += y.numel()
    if was_training:
        method.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
    return device


def build_run_model(config: TrainConfig, info: DatasetInfo, model_args: dict[str, Any],
                    device: torch.device) -> nn.Sequential:
    """The run's model with its seeded initial weights, on ``device``; ``--model-option`` values win
    over the dataset's ``model_args``."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, info.input_shape, info.num_classes,
                        **{**model_args, **config.model_options})
    return model.to(device)


def check_model_reads(model: nn.Module, sample: torch.Tensor, config: TrainConfig) -> None:
    """One forward of two training examples before anything trains, so a model that cannot read the
    data (a flat-input ``mlp`` given ``text``'s token ids) fails in one line naming both, not with a
    traceback from deep inside torch. Eval mode, no autograd, random state forked: the run is unchanged.

    Raises:
        ConfigError: the model's forward failed on the data's examples.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fork_rng(sample.device):
            model(sample[:2])
    except GradkitError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model {model_label(config.model)} cannot read the examples of {data_label(config.data)} "
            f"({str(sample.dtype).replace('torch.', '')}, shape {tuple(sample.shape[1:])}): {reason}; "
            "choose a model for this data (models: gradkit train --help), or convert the input in your "
            "model factory") from None
    finally:
        model.train(was_training)


def check_resume(config: TrainConfig, saved_config: dict[str, Any], folder: RunFolder) -> None:
    """Refuse ``--resume`` with options that would change what is computed."""
    conflicts = config.resume_conflicts(TrainConfig.from_dict(saved_config))
    if conflicts:
        raise ConfigError(
            f"--resume with different options than the run in {folder}: {'; '.join(conflicts)}; "
            "use the original options (only --epochs, --threads, --device and the optimizer settings "
            "--lr, --momentum, --nesterov, --weight-decay, --lr-schedule, --milestones, --warmup-steps may change)"
        )


def apply_resume_changes(config: TrainConfig, saved_config: dict[str, Any], method: Method) -> dict[str, list[Any]]:
    """Set the optimizer settings ``--resume`` changed (see ``TrainConfig.resume_changes``) on the
    restored optimizers; returns the changes (nothing is touched when there are none)."""
    changes = config.resume_changes(TrainConfig.from_dict(saved_config))
    if not changes:
        return changes
    settings = config.optimizer_config()
    for opt in method.optimizers:
        for group in opt.param_groups:
            # The loop sets lr = initial_lr * schedule factor before every step.
            group["initial_lr"] = group["lr"] = settings.lr
            group["weight_decay"] = settings.weight_decay
            if "stale_momentum" in group:  # -o stale_momentum sets these stages' momentum itself
                continue
            if "momentum" in group:
                group["momentum"] = settings.momentum
            if "nesterov" in group:
                group["nesterov"] = settings.nesterov
    log.info("resuming with changed settings: %s",
             ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items()))
    return changes


def split_sizes(config: TrainConfig, model: nn.Sequential, sample: torch.Tensor | None, *,
                stage_parallel: bool) -> list[int]:
    """Blocks per stage for ``config``.

    With time balancing, a pipelined method's cost model picks the cut (FR's early stages pay an
    extra replay forward). In one process only the methods that are their own stage-parallel form
    (fr, ddg, dni) pipeline; ``bp`` there is one model, balanced by plain forward+backward time. With
    one process per stage, ``bp`` runs as its synchronous pipeline and uses that cost.
    """
    form = stage_parallel_class(config.method)
    pipelines = form is not None and (stage_parallel or form is METHODS.get(config.method))
    return choose_sizes(
        model, stages=config.stages, balance=config.balance, stage_sizes=config.stage_sizes,
        sample=sample, method=config.method if pipelines else None, model_name=model_label(config.model),
    )


class Backend(ABC):
    """A run's answers to the training loop's questions (see the module docstring).

    A subclass sets, in its constructor: ``config``, ``folder``, ``model``, ``method``, ``stage_sizes``,
    ``steps_per_epoch``, ``progress`` (restored on resume) and the role flags below.
    """

    config: TrainConfig
    folder: RunFolder | None
    model: nn.Sequential
    method: Method
    activations: Activations
    stage_sizes: list[int]
    steps_per_epoch: int
    progress: Progress
    reports: bool = True
    """This process evaluates and writes ``config.json``, ``metrics.jsonl`` and ``model.pt``."""
    holds_loss: bool = True
    """This process sees every step's loss (keeps the tally, shows the progress bar, notices NaN)."""
    multi_process: bool = False
    label: str = ""
    """Prefix of the progress bar."""
    memory: MemoryReport | None = None
    """Activation memory of the first step where every stage is busy (single process only; workers
    report their stages' figures through :meth:`record_extras`)."""
    resume_changes: dict[str, list[Any]] = {}  # noqa: RUF012 (replaced, never mutated)
    """Optimizer settings this ``--resume`` changed, ``{name: [old, new]}`` (applied on restore)."""
    task: str = "classification"
    """The dataset's ``DatasetInfo.task``: ``next-token`` runs also report ``test_bpc``."""

    @abstractmethod
    def batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on (one per step, on every process)."""

    @abstractmethod
    def train_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
        """One training step; the loss where :attr:`holds_loss`."""

    def stop_agreed(self, stop: threading.Event) -> bool:
        """Whether to stop before the next step (every process must answer the same)."""
        return stop.is_set()

    @abstractmethod
    def evaluate(self) -> tuple[float, float] | None:
        """Test loss and accuracy of the current weights where :attr:`reports`, else None."""

    def shared_tally(self, tally: EpochTally) -> EpochTally:
        """The epoch's tally as the process that holds the loss kept it."""
        return tally

    def shared_record(self, record: dict[str, Any] | None) -> dict[str, Any]:
        """The epoch record the reporting process built."""
        assert record is not None
        return record

    def record_extras(self) -> dict[str, Any]:
        """Keys added to every epoch record after the common ones (called in every process)."""
        return {}

    def memory_step(self) -> int:
        """The global step whose activation memory is measured: the first where every pipeline stage
        is busy (FR's FIFOs and DDG's stashes are full), or the run's last step if it ends sooner."""
        return min(self.method.steady_step, self.steps_per_epoch * self.config.epochs - 1)

    @abstractmethod
    def checkpoint(self) -> Path | None:
        """Save the exact position; returns where (None without ``--out``)."""

    @abstractmethod
    def finish(self) -> None:
        """After the last epoch: finish the batches in flight and write the final weights."""

    def config_record(self) -> dict[str, Any]:
        """What ``config.json`` holds."""
        return {**self.config.to_dict(), "stage_sizes": self.stage_sizes}


class LocalBackend(Backend):
    """Every stage in this process: the plain ``gradkit.train`` run.

    Args:
        config: the run.
        dataset: an already loaded dataset (else ``config.data`` is loaded).
    """

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None) -> None:
        self.config = config
        self.folder = RunFolder(config.out) if config.out is not None else None
        self.device = resolve_device(config.device)  # --threads: gradkit.train sets it for the run's length
        saved = self._saved_state()
        if dataset is None:
            dataset = load_dataset(config.data, config.data_dir, download=config.download,
                                   limit_train=config.limit_train, limit_test=config.limit_test,
                                   seed=config.seed, options=config.data_options)
        info = dataset.info
        self.task = info.task
        self.train_loader = BatchLoader(dataset.train_x, dataset.train_y, info, config.batch_size,
                                        train=True, seed=config.seed, device=self.device)
        self.test_loader = BatchLoader(dataset.test_x, dataset.test_y, info, config.eval_batch_size,
                                       train=False, seed=config.seed, device=self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.model = build_run_model(config, info, dataset.model_args, self.device)
        first_batch, _ = next(iter(self.train_loader.epoch(0)))  # the order is a function of (seed, epoch)
        check_model_reads(self.model, first_batch, config)
        if saved:
            self.stage_sizes = list(saved["stage_sizes"])
        else:
            sample = None
            if config.balance == "time" and config.stages > 1 and config.stage_sizes is None:
                sample = first_batch
            self.stage_sizes = split_sizes(config, self.model, sample, stage_parallel=False)
        self.method = build(config.method, split(self.model, sizes=self.stage_sizes),
                            optimizer=config.optimizer_config().factory(), **config.method_options)
        self.label = config.method
        # --activations: low-bit copies of what autograd saves, inside every step (exact: nothing).
        self.activations = Activations(self.model, config.activations, group_size=config.activation_group_size,
                                       attention_bits=config.attention_bits)
        # --precision bf16: autocast around the step, outside the compressor's hooks.
        self.precision = Precision(config.precision, self.device)
        self._step: Callable[[torch.Tensor, torch.Tensor], float] = self.precision.wrap(
            self.activations.wrap(self.method.step))
        self.progress = Progress()
        self.activation_bytes: int | None = None
        self.stage_memory: list[dict[str, int]] | None = None
        self._memory_step = self.memory_step()
        if saved:
            self._restore(saved)

    # -- resume -------------------------------------------------------------------------------------
    def _saved_state(self) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        if not self.config.resume:
            self.folder.check_new_run()
            return None
        saved = self.folder.load_checkpoint()
        check_resume(self.config, saved["config"], self.folder)
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        self.method.load_state_dict(saved["method_state"])
        self.progress = Progress(saved["epoch"], saved["step_in_epoch"], saved["global_step"],
                                 EpochTally(**saved["tally"]), list(saved["history"]), dict(saved.get("changes") or {}))
        self.resume_changes = apply_resume_changes(self.config, saved["config"], self.method)
        self.progress.add_changes(self.resume_changes)
        self.activation_bytes = saved.get("activation_bytes")
        self.stage_memory = saved.get("stage_memory")
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        # The checkpoint is the truth: metrics lines written after it was saved are dropped.
        assert self.folder is not None
        self.folder.rewrite_metrics(self.progress.history)

    # -- the loop's questions ---------------------------------------------------------------------------
    def batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        for x, y in self.train_loader.epoch(epoch, start_step=start_step):
            yield x, y, int(y.shape[0])

    def train_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float:
        assert x is not None and y is not None
        global_step = self.progress.global_step
        every = self.config.measure_direction
        if global_step == self._memory_step:
            measured_loss, self.memory = measure_step(self.method, x, y, step=self._step)
            self.activation_bytes = self.memory.activation_bytes
            self.stage_memory = [s.to_dict() for s in self.memory.stages]
            assert measured_loss is not None  # one process sees the loss
            return measured_loss
        if every is not None and global_step % every == 0:
            loss, sample = measure_direction(self.method, x, y, step=self._step)
            if sample is not None:
                self.progress.tally.direction.append([sample.sigma, sample.cosine])
            return loss
        return self._step(x, y)

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.method, self.test_loader)

    def record_extras(self) -> dict[str, Any]:
        return {"activation_bytes": self.activation_bytes, "stage_memory": self.stage_memory,
                **self.method.epoch_metrics()}

    def checkpoint(self) -> Path | None:
        if self.folder is None:
            return None
        p = self.progress
        return self.folder.save_checkpoint({
            "config": self.config.to_dict(),
            "stage_sizes": self.stage_sizes,
            "method_state": self.method.state_dict(),
            "epoch": p.epoch,
            "step_in_epoch": p.step_in_epoch,
            "global_step": p.global_step,
            "tally": p.tally.state(),
            "history": p.history,
            "changes": p.changes,
            "activation_bytes": self.activation_bytes,
            "stage_memory": self.stage_memory,
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        })

    def finish(self) -> None:
        self.precision.wrap(self.activations.wrap(self.method.flush))()
        if self.folder is not None:
            self.folder.write_model(self.model.state_dict())
