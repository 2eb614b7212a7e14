"""Running sums of the epoch in progress, and the ``metrics.jsonl`` record they become.

The tally is saved in checkpoints, so a resumed epoch adds up to what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CURVE_POINTS_PER_EPOCH", "EpochTally"]

CURVE_POINTS_PER_EPOCH = 10
"""Points of the training-loss curve per epoch, so that short runs still plot as curves."""


@dataclass
class EpochTally:
    """Loss and time sums of the epoch in progress."""

    loss_sum: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    window_loss: float = 0.0
    window_samples: int = 0
    curve: list[list[float]] = field(default_factory=list)
    """[epoch progress, training seconds since the run began, mean train loss of the window] points,
    :data:`CURVE_POINTS_PER_EPOCH` per epoch."""
    direction: list[list[float]] = field(default_factory=list)
    """[σ, cosine] of the steps measured with :func:`gradkit.direction.measure_direction`."""

    def add(self, loss: float, n: int) -> None:
        """Count a step's mean loss over ``n`` samples."""
        self.loss_sum += loss * n
        self.samples += n
        self.window_loss += loss * n
        self.window_samples += n

    def close_window(self, progress: float, elapsed_total: float) -> None:
        """End a curve window: one point at ``progress`` (epochs) and ``elapsed_total`` seconds."""
        if self.window_samples:
            self.curve.append([progress, elapsed_total, self.window_loss / self.window_samples])
        self.window_loss, self.window_samples = 0.0, 0

    def state(self) -> dict[str, Any]:
        """Plain data for checkpoints; ``EpochTally(**state)`` restores it."""
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

    def direction_summary(self) -> dict[str, Any]:
        """Per-epoch mean and minimum of σ and of the cosine (``--measure-direction``)."""
        sigmas = [d[0] for d in self.direction]
        cosines = [d[1] for d in self.direction]
        return {
            "direction_samples": len(sigmas),
            "direction_sigma_mean": sum(sigmas) / len(sigmas) if sigmas else None,
            "direction_sigma_min": min(sigmas) if sigmas else None,
            "direction_cosine_mean": sum(cosines) / len(cosines) if cosines else None,
            "direction_cosine_min": min(cosines) if cosines else None,
        }
