"""Bytes saved for backward by one training step, exact and under an ``--activations`` mode."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradkit.compress._check import require_one_input
from gradkit.compress._hooks import SavedRecord
from gradkit.compress._modes import Activations
from gradkit.losses import cross_entropy

__all__ = ["ActivationMemory", "measure_activations"]


@dataclass(frozen=True)
class ActivationMemory:
    """Activation memory of one forward+backward, with and without compression."""

    mode: str
    exact_bytes: int
    """Saved for backward by exact training (parameters excluded, each storage once)."""
    stored_bytes: int
    """Saved for backward under ``mode``: packed codes and ranges plus what it keeps exact."""
    records: list[SavedRecord] = field(default_factory=list, repr=False)
    """The saved tensors under ``mode``, in the order they were saved."""

    @property
    def ratio(self) -> float:
        return self.exact_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "exact_bytes": self.exact_bytes, "stored_bytes": self.stored_bytes,
                "ratio": round(self.ratio, 3)}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy if it is a view into a larger storage (saved-tensor hooks count storages)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _saved(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           options: dict[str, object]) -> list[SavedRecord]:
    act = Activations(model, mode, **options)
    model.train()
    try:
        with act, act.recording() as records:
            loss = loss_fn(model(x), y)
        loss.backward()  # proves the stored copies decode; also frees them
    finally:
        act.close()
    return records


def measure_activations(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: str,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    exact_bytes: int | None = None,
    **options: object,
) -> ActivationMemory:
    """Measure one training step of a copy of ``model`` exactly and under ``mode``.

    Both are counted by the same hooks, so the ratio compares like with like: parameters and buffers
    are excluded, a storage saved by several operations counts once, and the input batch (kept: the
    caller holds it) counts in both, at its own size: a batch that is a slice of a larger tensor (a
    dataset's first rows) is copied first, as a data loader's batch would be, so the rest of that
    tensor's storage is not counted. ``model(x)`` must return what ``loss_fn`` scores (logits, for the
    default per-example or per-token cross-entropy).

    Raises:
        ConfigError: the model's forward needs more than ``x`` (it takes targets), or its output does
            not fit the default loss.
    """
    require_one_input(model, "measure_activations")
    x, y = _compact(x), _compact(y)
    if mode == "exact" or exact_bytes is None:
        exact = _saved(copy.deepcopy(model), x, y, "exact", loss_fn, {})
        exact_bytes = sum(r.exact_bytes for r in exact)
        if mode == "exact":
            return ActivationMemory(mode, exact_bytes, exact_bytes, exact)
    records = _saved(copy.deepcopy(model), x, y, mode, loss_fn, options)
    return ActivationMemory(mode, exact_bytes, sum(r.stored_bytes for r in records), records)
