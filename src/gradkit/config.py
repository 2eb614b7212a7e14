"""The configuration of one training run, as a typed, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradkit.compress import MAX_GROUP_SIZE, parse_attention_bits
from gradkit.errors import ConfigError
from gradkit.optim import LR_SCHEDULES, OPTIMIZERS, LRSchedule, OptimizerConfig
from gradkit.registry import import_path_of

__all__ = ["TrainConfig", "BALANCES", "MAX_THREADS"]

BALANCES = ("count", "params", "time")
"""How stages are balanced (``gradkit.split(balance=...)``, ``--balance``): blocks, parameters, or
profiled time."""

# Mirrors gradkit.compress.MODES (a test keeps them equal) without importing torch code here.
ACTIVATION_MODES = ("exact", "blpa8", "blpa4", "int8", "int4", "int2", "naive8")
# Mirrors gradkit.precision.PRECISIONS (a test keeps them equal).
PRECISIONS = ("fp32", "bf16")

# Upper bound on torch threads (--threads). Fixed rather than a multiple of this machine's cores, so that a
# config valid on one machine stays valid on another (a run may be resumed elsewhere); far above any CPU we
# train on (more threads than cores only contend), and far below where thread creation fails: 100000
# threads exhaust RLIMIT_NPROC and OpenBLAS's thread table, and the process crashes.
MAX_THREADS = 1024

# Fields that may differ between a run and its --resume: they change how, not what, is computed.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "threads", "resume", "data_dir", "download", "progress", "device", "out", "measure_direction"}
)
# Optimizer settings a --resume may change (a lower --lr after divergence, more weight decay, another lr
# schedule): they change how the remaining steps update the weights, but not the model, its split, the
# data order or the layout of the saved optimizer state, so the restored state stays valid. They are
# applied to the restored optimizers and recorded (config.json "resume_changes", the next epoch record's
# "changes"). Not among them: the optimizer itself (Adam's state is not SGD's), batch size, seed, data.
_RESUMABLE_OPTIMIZER_CHANGES = ("lr", "momentum", "nesterov", "weight_decay", "lr_schedule", "milestones")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a training run; the CLI's ``gradkit train`` options map onto it 1:1."""

    method: str = "bp"
    """Training method, a name from ``gradkit.methods.METHODS``."""
    model: str | Callable[..., Any] = "mlp"
    """Model: a name from ``gradkit.models.MODELS``, an import path ``"package.module:factory"``, or
    the factory itself (see :func:`gradkit.models.build_model` for the contract). A factory defined at
    the top level of an importable module is stored as its import path; any other callable (a lambda,
    a local function, one in ``__main__``) cannot reach worker processes or a resumed run."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the model (``--model-option``), e.g. ``{"layers": 2}`` for ``gpt``."""
    data: str | Callable[..., Any] = "digits"
    """Dataset: a name from ``gradkit.data.DATASETS``, an import path ``"package.module:function"``,
    or the function itself (see :func:`gradkit.data.load_dataset`); stored like ``model``."""
    data_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the dataset loader (``--data-option``), e.g. ``{"context": 32}`` for ``text``."""
    out: str | None = None
    """Run folder for ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt``; None writes nothing."""
    data_dir: str | None = None
    """Folder searched first for dataset files (else ``$GRADKIT_DATA`` and the standard places)."""
    download: bool = False
    """Fetch the dataset from its official source when it is not found."""
    stages: int = 1
    """Number of pipeline stages K the model is split into."""
    balance: str = "params"
    """How stages are balanced: ``time`` (profiled), ``params`` or ``count``."""
    stage_sizes: tuple[int, ...] | None = None
    """Blocks per stage, e.g. ``(4, 7)``; overrides ``balance`` (its length must equal ``stages``)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Method-specific options, passed to the method's constructor."""
    activations: str = "exact"
    """How activations are kept for backward: a mode of ``gradkit.compress.MODES`` (``exact``,
    ``blpa8``, ``blpa4``, ``int8``, ``int4``, ``int2``, ``naive8``)."""
    activation_group_size: int = 256
    attention_bits: str = "auto"
    """Width kept for attention's saved tensors under a low-bit mode (``--attention-bits``): ``auto`` (the
    mode's: 8 bits under int2, else the mode's width), ``off``, ``exact``, or at least ``2``/``4``/``8``
    (see ``gradkit.compress._rules``). An int is stored as its string."""
    """Elements sharing one quantisation range in the generic path (a multiple of 8, at most
    ``gradkit.compress.MAX_GROUP_SIZE`` = 4096, the kernels' limit; smaller groups: tighter ranges, more range bytes)."""
    precision: str = "fp32"
    """Arithmetic of the training step: ``fp32``, or ``bf16`` (``torch.autocast`` with bfloat16 around
    every method's step; fp32 weights, optimizer state and loss; :mod:`gradkit.precision`)."""
    epochs: int = 5
    """Number of passes over the training set."""
    batch_size: int = 128
    """Mini-batch size for training (the last, smaller batch of an epoch is kept)."""
    eval_batch_size: int = 1000
    """Mini-batch size for evaluation."""
    optimizer: str = "sgd"
    """``sgd`` or ``adam``."""
    lr: float | None = None
    """Initial learning rate; None means 0.05 for SGD and 0.001 for Adam."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule: ``constant``, ``multistep`` or ``cosine``."""
    schedule: dataclasses.InitVar[str | None] = None
    """Deprecated name of ``lr_schedule`` (kept for one release)."""
    milestones: tuple[int, ...] = ()
    """Epochs where ``multistep`` divides the rate by 10 (default: 50% and 75% of training)."""
    seed: int = 0
    """Seed of weight initialisation, data order and augmentation."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""
    workers: int | None = None
    """Processes, one per stage (``--workers K`` starts them; under torchrun the world size); None or
    1 trains in this process."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    limit_train: int | None = None
    """Train on a stratified subset of this many samples."""
    limit_test: int | None = None
    """Evaluate on a stratified subset of this many samples."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint."""
    measure_direction: int | None = None
    """Every this many steps, also compute the true gradient and log σ and the cosine of the method's
    update direction (:mod:`gradkit.direction`); None measures nothing."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self, schedule: str | None) -> None:
        if schedule is not None:
            warnings.warn("TrainConfig(schedule=...) is renamed lr_schedule=; the old name goes in the next "
                          "release", DeprecationWarning, stacklevel=3)
            self.lr_schedule = schedule
        self._resolve_callables()
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}"
            )
        if self.activations not in ACTIVATION_MODES:
            raise ConfigError(
                f"unknown activations {self.activations!r}; choose one of: {', '.join(ACTIVATION_MODES)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if (not isinstance(self.activation_group_size, int) or self.activation_group_size < 8
                or self.activation_group_size % 8 or self.activation_group_size > MAX_GROUP_SIZE):
            raise ConfigError(f"--activation-group-size must be a positive multiple of 8 of at most "
                              f"{MAX_GROUP_SIZE}, got {self.activation_group_size}")
        self.attention_bits = str(self.attention_bits).strip().lower()
        parse_attention_bits(self.attention_bits, self.activations)
        if self.balance not in BALANCES:
            raise ConfigError(f"unknown balance {self.balance!r}; choose one of: {', '.join(BALANCES)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("limit_train", "limit_test", "threads", "measure_direction", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ConfigError(f"--threads must be at most {MAX_THREADS}, got {self.threads}; "
                              f"use about this machine's core count")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"--lr must be a finite number >= 0, got {self.lr}")
        if self.resume and self.out is None:
            raise ConfigError("--resume needs --out, the folder of the run to continue")
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.stage_sizes is not None:
            self.stage_sizes = tuple(int(v) for v in self.stage_sizes)
            if self.stages == 1:  # --stage-sizes 4,7 alone means two stages
                self.stages = len(self.stage_sizes)
            if len(self.stage_sizes) != self.stages or min(self.stage_sizes) < 1:
                raise ConfigError(
                    f"--stage-sizes {','.join(map(str, self.stage_sizes))} must give {self.stages} positive "
                    f"block counts, one per stage (--stages {self.stages})"
                )
        # Building these validates momentum, weight decay and milestones now, not mid-run.
        self.optimizer_config()
        self.learning_rate_schedule()

    def _resolve_callables(self) -> None:
        """Store a model/data callable as its import path, so that it travels; refuse one that can't."""
        for name in ("model", "data"):
            value = getattr(self, name)
            if isinstance(value, str):
                continue
            if not callable(value):
                raise ConfigError(f"{name} must be a registered name, 'package.module:function' or a "
                                  f"callable, got {value!r}")
            path = import_path_of(value)
            if path is not None:
                setattr(self, name, path)
            elif self.resume or (self.workers or 1) > 1:
                raise ConfigError(
                    f"{name}={getattr(value, '__qualname__', value)!r} is a callable that other processes and "
                    "resumed runs cannot import; define it at the top level of a module and pass "
                    f"{name}='module:{'factory' if name == 'model' else 'function'}'"
                )

    @property
    def effective_lr(self) -> float:
        """The learning rate used: ``lr``, or the optimizer's default."""
        if self.lr is not None:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 0.001

    def optimizer_config(self) -> OptimizerConfig:
        """The optimizer this run uses."""
        return OptimizerConfig(
            name=self.optimizer,
            lr=self.effective_lr,
            momentum=self.momentum,
            nesterov=self.nesterov and self.optimizer == "sgd",
            weight_decay=self.weight_decay,
        )

    def learning_rate_schedule(self) -> LRSchedule:
        """The learning-rate schedule this run uses."""
        return LRSchedule(kind=self.lr_schedule, milestones=self.milestones)

    @property
    def out_path(self) -> Path | None:
        """``out`` as a path."""
        return Path(self.out) if self.out is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for ``config.json`` and checkpoints."""
        d = dataclasses.asdict(self)
        for name in ("model", "data"):  # a callable no import path reaches: recorded by name only
            if not isinstance(d[name], str):
                d[name] = f"<callable {getattr(d[name], '__qualname__', d[name])}>"
        d["milestones"] = list(self.milestones)
        d["stage_sizes"] = list(self.stage_sizes) if self.stage_sizes is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older or newer gradkit)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if "schedule" in d and "lr_schedule" not in d:  # written before the rename
            d = {**d, "lr_schedule": d["schedule"]}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "milestones" in kwargs:
            kwargs["milestones"] = tuple(kwargs["milestones"])
        if kwargs.get("stage_sizes") is not None:
            kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
        return cls(**kwargs)

    def resume_conflicts(self, saved: TrainConfig) -> list[str]:
        """Options that differ from ``saved`` in a way that would change the computation."""
        conflicts = []
        for f in dataclasses.fields(self):
            if f.name in _RESUMABLE_CHANGES or f.name in _RESUMABLE_OPTIMIZER_CHANGES:
                continue
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if mine != theirs:
                conflicts.append(f"{f.name}={theirs!r} (now {mine!r})")
        return conflicts

    def resume_changes(self, saved: TrainConfig) -> dict[str, list[Any]]:
        """Optimizer settings a ``--resume`` changes from ``saved``: ``{name: [old, new]}``."""
        changes: dict[str, list[Any]] = {}
        for name in _RESUMABLE_OPTIMIZER_CHANGES:
            mine, theirs = getattr(self, name), getattr(saved, name)
            if name == "lr":
                mine, theirs = self.effective_lr, saved.effective_lr
            elif name == "milestones":
                mine, theirs = list(mine), list(theirs)
            if mine != theirs:
                changes[name] = [theirs, mine]
        return changes
