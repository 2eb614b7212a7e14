"""Optimizers and learning-rate schedules, as plain configuration.

Methods receive an *optimizer factory* (parameters -> optimizer) rather than an optimizer, because a
decoupled method such as Features Replay keeps one optimizer per stage. Schedules are stateless
functions of training progress, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from gradkit.errors import ConfigError

__all__ = ["OptimizerFactory", "OptimizerConfig", "LRSchedule", "OPTIMIZERS", "LR_SCHEDULES"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "multistep", "cosine")
"""Learning-rate schedules (pipeline schedules are the methods', in :mod:`gradkit.pipeline`)."""


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Which optimizer to build and with what hyper-parameters."""

    name: str = "sgd"
    """``sgd`` or ``adam``."""
    lr: float = 0.05
    """Initial learning rate (the schedule multiplies it)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD with Nesterov momentum (the Features Replay reference code uses it)."""
    weight_decay: float = 5e-4
    """L2 penalty added to the gradient (coupled, as in ``torch.optim.SGD``/``Adam``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a finite number >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("Nesterov momentum needs momentum > 0; pass --momentum or --no-nesterov")

    def factory(self) -> OptimizerFactory:
        """A function that builds this optimizer over the parameters it is given."""

        def build(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
            params = list(params)
            if self.name == "sgd":
                return torch.optim.SGD(
                    params,
                    lr=self.lr,
                    momentum=self.momentum,
                    nesterov=self.nesterov,
                    weight_decay=self.weight_decay,
                )
            return torch.optim.Adam(
                params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
            )

        return build


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Learning-rate multiplier as a function of training progress.

    Example:
        >>> LRSchedule(kind="multistep", milestones=(150, 225)).factor(200.0, total_epochs=300)
        0.010000000000000002
    """

    kind: str = "cosine"
    """``constant``, ``multistep`` (multiply by ``gamma`` at each milestone) or ``cosine`` (to 0)."""
    milestones: Sequence[int] = field(default_factory=tuple)
    """Epochs at which ``multistep`` decays; empty means at 50% and 75% of training."""
    gamma: float = 0.1
    """Decay factor of ``multistep``."""
    warmup_steps: int = 0
    """Linear warm-up over the first this many steps: step s (from 0) is multiplied by ``(s+1)/warmup_steps``
    on top of ``kind`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; the usual start for
    transformers, and a remedy for stale gradients in pipelines). 0: none."""

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.kind!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if any(m <= 0 for m in self.milestones):
            raise ConfigError(f"milestones must be positive epochs, got {list(self.milestones)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")

    def factor(self, progress: float, *, total_epochs: int, steps_per_epoch: int = 1) -> float:
        """Multiplier at ``progress`` epochs into training (fractional within an epoch); the warm-up
        counts steps, ``progress * steps_per_epoch``."""
        warm = 1.0
        if self.warmup_steps:
            step = round(progress * steps_per_epoch)
            warm = min(1.0, (step + 1) / self.warmup_steps)
        return warm * self._decay(progress, total_epochs)

    def _decay(self, progress: float, total_epochs: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            milestones = self.milestones or (round(0.5 * total_epochs), round(0.75 * total_epochs))
            # Decays apply from the start of the milestone epoch, per-epoch, like MultiStepLR.
            passed = sum(1 for m in milestones if math.floor(progress) >= m)
            return self.gamma**passed
        return 0.5 * (1.0 + math.cos(math.pi * min(progress / max(total_epochs, 1), 1.0)))
