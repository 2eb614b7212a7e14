"""Measuring activation memory: bytes saved for the backward pass.

Counts every tensor autograd saves for backward while a piece of code runs, through
``torch.autograd.graph.saved_tensors_hooks``. Parameters are excluded (they are memory the model holds
anyway), and each storage is counted once even when several operations save it (a ReLU output saved by
the ReLU and by the next convolution costs its bytes once). On CUDA, peak allocated memory is
reported too. Later methods (Features Replay, low-bit activations) are compared with this meter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import torch

__all__ = ["SavedTensor", "SavedTensorsMeter", "MemoryReport", "measure_step", "tensor_bytes"]


@dataclass(frozen=True)
class SavedTensor:
    """One storage saved for backward: its first tensor's shape and dtype, and the storage's bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class SavedTensorsMeter:
    """Context manager that records the tensors autograd saves for backward.

    Example:
        >>> with SavedTensorsMeter(exclude=model.parameters()) as meter:
        ...     loss = loss_fn(model(x), y)
        >>> meter.bytes  # activations the backward pass will read
        1234944

    Args:
        exclude: tensors not to count (normally the model's parameters and buffers).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, SavedTensor] = {}
        # Holding the storages until exit keeps their addresses from being reused by a later,
        # different tensor, which would otherwise be mistaken for the same storage.
        self._alive: list[torch.UntypedStorage] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr not in self._seen and storage.nbytes() > 0:
            self._seen[ptr] = SavedTensor(tuple(tensor.shape), tensor.dtype, storage.nbytes())
            self._alive.append(storage)
        return tensor

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None
        self._alive.clear()

    @property
    def bytes(self) -> int:
        """Total bytes of distinct saved storages."""
        return sum(s.nbytes for s in self._seen.values())

    @property
    def tensors(self) -> list[SavedTensor]:
        """The saved storages, in the order they were first saved."""
        return list(self._seen.values())


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one training step."""

    saved_bytes: int
    """Activations saved for backward during the step (parameters excluded, storages counted once)."""
    buffer_bytes: int = 0
    """In-flight buffers the method keeps between steps (FIFOs, stashed graphs...)."""
    peak_cuda_bytes: int | None = None
    """Peak CUDA memory allocated during the step, when it ran on a GPU."""
    tensors: list[SavedTensor] = field(default_factory=list, repr=False)

    @property
    def activation_bytes(self) -> int:
        """Saved activations plus in-flight buffers: what the method needs beyond the weights."""
        return self.saved_bytes + self.buffer_bytes


def measure_step(method, x: torch.Tensor, y: torch.Tensor) -> tuple[float, MemoryReport]:  # noqa: ANN001
    """Run one real training step of ``method`` and measure its activation memory.

    Args:
        method: a :class:`gradkit.methods.Method`.
        x, y: one mini-batch.

    Returns:
        The step's loss and a :class:`MemoryReport`.
    """
    exclude = [p for stage in method.stages for p in stage.parameters()]
    exclude += [b for stage in method.stages for b in stage.buffers()]
    on_cuda = x.is_cuda and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
    with SavedTensorsMeter(exclude=exclude) as meter:
        loss = method.step(x, y)
    peak = torch.cuda.max_memory_allocated(x.device) if on_cuda else None
    report = MemoryReport(meter.bytes, method.buffer_bytes(), peak, meter.tensors)
    return loss, report
