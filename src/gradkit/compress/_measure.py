"""Bytes saved for backward by one training step, exact and under an ``--activations`` mode."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradkit.compress._check import require_one_input
from gradkit.compress._hooks import SavedRecord
from gradkit.compress._modes import Activations
from gradkit.losses import cross_entropy

__all__ = ["ActivationMemory", "LiveTensorPeak", "measure_activations"]


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
    caller holds it) counts in both. ``model(x)`` must return what ``loss_fn`` scores (logits, for the
    default per-example or per-token cross-entropy).

    Raises:
        ConfigError: the model's forward needs more than ``x`` (it takes targets), or its output does
            not fit the default loss.
    """
    require_one_input(model, "measure_activations")
    if mode == "exact" or exact_bytes is None:
        exact = _saved(copy.deepcopy(model), x, y, "exact", loss_fn, {})
        exact_bytes = sum(r.exact_bytes for r in exact)
        if mode == "exact":
            return ActivationMemory(mode, exact_bytes, exact_bytes, exact)
    records = _saved(copy.deepcopy(model), x, y, mode, loss_fn, options)
    return ActivationMemory(mode, exact_bytes, sum(r.stored_bytes for r in records), records)


class LiveTensorPeak(TorchDispatchMode):
    """Inside it, ``peak`` is the most bytes that tensors made by torch operations held at once.

    Unlike ``torch.cuda.max_memory_allocated`` it leaves out library workspaces (cuDNN's convolution
    workspace: ~130 MiB for ResNet-20 at batch 128 on an H200), which no activation mode changes and
    which set a floor under the allocator's peak. What it counts is what activation compression
    controls: saved copies, decoded copies and temporaries. Any device; slows the ops it watches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:  # views share their base's storage
            return
        self._live[key] = size
        self.current += size
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._live.pop(key, None)
        if size is not None:
            self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out
