"""Smaller steps for stages whose gradients are stale (fr, ddg): the ``stale_lr`` and
``stale_momentum`` options, and what their default, ``auto``, means at each stage boundary.

A stage k of K gets gradients τ = K-1-k steps old. The paper's rule (Huo et al. 2018) steps every
stage like backprop would; ``auto`` keeps that rule except where a stale stage hands a sequence
``(N, T, C)`` on, as a language model's blocks do. There it divides the stage's learning rate by 1+τ
and sets its momentum (Adam's β1) to 0.5: on the 4-layer ``gpt`` of ``benchmarks/language-model`` (300 steps, seeds 0-4)
this took fr K=2 from +0.240 to +0.085 and ddg K=2 from +0.238 to +0.073 in validation loss against
backprop, and fr K=4 from +0.584 to +0.155 (seed 0). With the paper's rule a stale δ that is wrong
the same way at every position piles up, through Adam's full-sized steps, into a part of the residual
stream common to all positions, and the model stays at the unigram loss (issue 14).
"""

from __future__ import annotations

import math
from typing import Any

from gradkit.errors import ConfigError
from gradkit.methods._base import scale_lr

__all__ = ["AUTO", "SEQUENCE_STALE_LR", "SEQUENCE_STALE_MOMENTUM", "STALE_LR", "apply_stale_steps", "awaits_auto_steps",
           "check_staleness_options", "resolve_auto_steps", "set_stale_momentum", "stale_lr_scale"]

AUTO = "auto"
"""The default of both options: the paper's rule, except at sequence boundaries (module docstring)."""

STALE_LR = ("none", "inverse", "sqrt")
"""Staleness-aware step sizes (``-o stale_lr=...``): a stage whose gradients are τ steps old gets
``lr / (1+τ)`` (``inverse``, Zhang et al., "Staleness-aware Async-SGD", IJCAI 2016) or
``lr / sqrt(1+τ)`` (``sqrt``); ``none`` leaves every stage at ``lr``."""

SEQUENCE_STALE_LR = "inverse"
"""What ``stale_lr=auto`` means for a stale stage whose output is a sequence."""

SEQUENCE_STALE_MOMENTUM = 0.5
"""What ``stale_momentum=auto`` means for a stale stage whose output is a sequence (β1 0.3 and 0.7
were measured too, and were no better)."""

_PENDING = "stale_steps_auto"
"""Marks a stale stage's optimizer groups while an ``auto`` option waits for the shape of the stage's
output. It is saved with the optimizer state, and cleared once resolved, so a resumed run keeps the
steps it started with (a checkpoint without the mark was resolved, or written before ``auto``)."""


def check_staleness_options(stale_lr: object, stale_momentum: object) -> None:
    """Refuse values of ``stale_lr`` and ``stale_momentum`` that cannot work.

    Raises:
        ConfigError: one line naming the option and the values it takes.
    """
    if stale_lr != AUTO and stale_lr not in STALE_LR:
        raise ConfigError(f"unknown stale_lr {stale_lr!r}; choose one of: {AUTO}, {', '.join(STALE_LR)}")
    if stale_momentum is None or stale_momentum == AUTO:
        return
    if isinstance(stale_momentum, bool) or not isinstance(stale_momentum, (int, float)) or not 0 <= stale_momentum < 1:
        raise ConfigError(f"stale_momentum must be a number in [0, 1) (Adam's beta1 or SGD's momentum of "
                          f"stages with stale gradients), {AUTO} or none (the optimizer's), got {stale_momentum!r}")


def stale_lr_scale(kind: str, staleness: int) -> float:
    """The learning-rate multiplier of a stage whose gradients are ``staleness`` steps old."""
    if kind == "inverse":
        return 1.0 / (1 + staleness)
    if kind == "sqrt":
        return 1.0 / math.sqrt(1 + staleness)
    return 1.0


def set_stale_momentum(group: dict[str, Any], momentum: float) -> None:
    """A stale stage's momentum (``-o stale_momentum=m``): Adam's β1 or SGD's momentum set to ``m``.

    Updates computed from τ-step-old gradients already carry momentum of their own (Mitliagkas et al.,
    "Asynchrony begets momentum", 2016), so stale stages are given less explicit momentum. The value
    is kept in the group, so a ``--resume`` that changes ``--momentum`` leaves these stages alone."""
    group["stale_momentum"] = momentum
    if "betas" in group:
        group["betas"] = (momentum, group["betas"][1])
    elif "momentum" in group:
        group["momentum"] = momentum
        if momentum == 0:
            group["nesterov"] = False  # torch's Nesterov step needs momentum > 0


def apply_stale_steps(group: dict[str, Any], staleness: int, stale_lr: str, stale_momentum: float | str | None) -> None:
    """Give an optimizer group of a stage ``staleness`` steps behind its explicit settings now, and
    mark it for :func:`resolve_auto_steps` where an option is ``auto``."""
    if staleness == 0:
        return
    if stale_lr != AUTO:
        scale_lr(group, stale_lr_scale(stale_lr, staleness))
    if stale_momentum is not None and stale_momentum != AUTO:
        set_stale_momentum(group, float(stale_momentum))
    if AUTO in (stale_lr, stale_momentum):
        group[_PENDING] = True


def awaits_auto_steps(group: dict[str, Any]) -> bool:
    """Whether an optimizer group still waits for :func:`resolve_auto_steps`."""
    return bool(group.get(_PENDING, False))


def resolve_auto_steps(group: dict[str, Any], staleness: int, stale_lr: str, stale_momentum: float | str | None,
                       *, sequence: bool) -> bool:
    """Settle a marked group's ``auto`` options, now that its stage's output is known to be a
    sequence or not; True if that gave it other steps than the paper's rule."""
    if not group.pop(_PENDING, False) or not sequence:
        return False
    if stale_lr == AUTO:
        scale_lr(group, stale_lr_scale(SEQUENCE_STALE_LR, staleness))
    if stale_momentum == AUTO:
        set_stale_momentum(group, SEQUENCE_STALE_MOMENTUM)
    return True
