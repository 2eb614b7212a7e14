"""Measuring activation memory: bytes saved for the backward pass.

Counts every tensor autograd saves for backward while a piece of code runs, through
``torch.autograd.graph.saved_tensors_hooks``. Parameters are excluded (they are memory the model holds
anyway), and each storage is counted once even when several operations save it (a ReLU output saved by
the ReLU and by the next convolution costs its bytes once). On CUDA, peak allocated memory is
reported too. Later methods (Features Replay, low-bit activations) are compared with this meter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import torch

__all__ = ["SavedTensor", "SavedTensorsMeter", "MemoryReport", "StageMemory", "measure_step", "tensor_bytes",
           "BatchSearch", "CudaMemoryStats", "largest_batch", "step_peak_bytes"]


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
        tag: called when a storage is first saved; its value is kept in :attr:`tags` (the
            per-stage accounting tags storages with the stage running at that moment).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), tag: Callable[[], object] | None = None) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, SavedTensor] = {}
        self._tag = tag
        self.tags: dict[int, object] = {}
        """Storage address -> the tag it was first saved under."""
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
            if self._tag is not None:
                self.tags[ptr] = self._tag()
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

    def storages(self) -> dict[int, SavedTensor]:
        """Storage address -> what was saved there."""
        return dict(self._seen)


@dataclass(frozen=True)
class StageMemory:
    """What one pipeline stage holds for its backward passes during a step."""

    saved_bytes: int
    """Activations its autograd graphs saved during the step (not counting buffered ones)."""
    buffers: dict[str, int] = field(default_factory=dict)
    """Bytes held across steps, by kind: ``fifo`` (FR inputs), ``stashed_graphs`` and
    ``stashed_weights`` (DDG), ``synthesizer`` and ``stored_outputs`` (DNI), ``messages`` (δ and
    activations waiting to be consumed)."""

    @property
    def total(self) -> int:
        return self.saved_bytes + sum(self.buffers.values())

    def to_dict(self) -> dict[str, int]:
        return {"saved_bytes": self.saved_bytes, **{f"{k}_bytes": v for k, v in self.buffers.items()},
                "total_bytes": self.total}


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
    stages: list[StageMemory] = field(default_factory=list)
    """The same bytes, stage by stage."""

    @property
    def activation_bytes(self) -> int:
        """Saved activations plus in-flight buffers: what the method needs beyond the weights."""
        return self.saved_bytes + self.buffer_bytes


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, torch.UntypedStorage]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}


def measure_step(method, x: torch.Tensor | None, y: torch.Tensor | None,  # noqa: ANN001
                 step: Callable[..., float | None] | None = None) -> tuple[float | None, MemoryReport]:
    """Run one real training step of ``method`` and measure its activation memory.

    Counts, each storage once: the tensors autograd saved during the step, plus the buffers the
    method holds across steps (:meth:`Method.stage_buffers`) before or after it — so for a pipeline in
    steady state, FR's K-k stored inputs per stage and DDG's K-k graphs per stage are all counted.
    Saved tensors are attributed to the stage whose forward was running when they were saved.

    Args:
        method: a :class:`gradkit.methods.Method`.
        x, y: one mini-batch (None where a pipeline's worker process does not hold them).
        step: what runs the step (default ``method.step``), e.g. the step wrapped by an
            :meth:`gradkit.compress.Activations.wrap`: its storage is what gets measured.

    Returns:
        The step's loss (None from a worker process whose stage does not compute it) and a
        :class:`MemoryReport`.
    """
    stages = method.stages
    exclude = [p for stage in stages for p in stage.parameters()]
    exclude += [b for stage in stages for b in stage.buffers()]
    # A worker process of a pipeline holds no batch (a middle stage) or only the labels (the last).
    device = next((t.device for t in (x, y, *exclude) if t is not None), torch.device("cpu"))
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = method.stage_buffers()
    # Holding the storages keeps a freed buffer's address from being taken by a new saved tensor.
    held = [_storages(t for ts in b.values() for t in ts) for b in before]
    current: list[int] = [0]
    hooks = [
        stage.register_forward_pre_hook(lambda module, args, k=k: current.__setitem__(0, k))
        for k, stage in enumerate(stages)
    ]
    try:
        with SavedTensorsMeter(exclude=exclude, tag=lambda: current[0]) as meter:
            loss = (step or method.step)(x, y)
            after = method.stage_buffers()
            saved = meter.storages()
            tags = dict(meter.tags)
    finally:
        for hook in hooks:
            hook.remove()
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None

    buffered: set[int] = set()
    per_stage_buffers: list[dict[str, int]] = []
    for k in range(len(stages)):
        kinds = sorted(set(before[k]) | set(after[k]))
        sizes = {}
        for kind in kinds:
            storages = _storages(before[k].get(kind, []))
            storages.update(_storages(after[k].get(kind, [])))
            fresh = {ptr: s for ptr, s in storages.items() if ptr not in buffered}
            sizes[kind] = sum(s.nbytes() for s in fresh.values())
            buffered.update(fresh)
        per_stage_buffers.append(sizes)
    saved_by_stage = [0] * len(stages)
    for ptr, record in saved.items():
        if ptr not in buffered:
            saved_by_stage[int(tags.get(ptr, len(stages) - 1))] += record.nbytes  # type: ignore[call-overload]
    del held
    stage_memory = [StageMemory(saved_by_stage[k], per_stage_buffers[k]) for k in range(len(stages))]
    report = MemoryReport(
        saved_bytes=sum(saved_by_stage),
        buffer_bytes=sum(sum(b.values()) for b in per_stage_buffers),
        peak_cuda_bytes=peak,
        tensors=meter.tensors,
        stages=stage_memory,
    )
    return loss, report


# -- peak CUDA memory of a step, and the largest batch that fits (``gradkit memory --device cuda``) --
class CudaMemoryStats:
    """The three CUDA allocator figures the peak measurement reads (a fake stands in for it in CPU tests)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


def step_peak_bytes(run: Callable[[], object], stats: CudaMemoryStats) -> int:
    """Peak memory allocated while ``run()`` executes, less what was allocated before it started
    (the model, its optimizer state, the batch): the step's own working memory."""
    stats.sync()
    before = stats.allocated()
    stats.reset_peak()
    run()
    stats.sync()
    return stats.peak() - before


@dataclass(frozen=True)
class BatchSearch:
    """The result of :func:`largest_batch`."""

    batch: int
    """The largest batch size that ran within the budget (0: not even ``start``)."""
    peak_bytes: int | None
    """Its measured step peak (None when ``batch`` is 0)."""
    tried: list[tuple[int, int | None]] = field(default_factory=list)
    """Every (batch size, peak bytes or None for out of memory / over budget), in order."""


def largest_batch(try_batch: Callable[[int], int], budget_bytes: int | None, *, start: int = 1,
                  limit: int = 1 << 20) -> BatchSearch:
    """The largest batch size whose step fits, by doubling then bisection (BLPA paper, Table 2).

    ``try_batch(b)`` runs one step at batch size ``b`` and returns its peak bytes; it may raise
    ``torch.cuda.OutOfMemoryError``. A batch fits when it runs and its peak is at most
    ``budget_bytes`` (None: whatever the device holds). Sizes double from ``start`` until one does not
    fit (or ``limit`` is reached), then the gap between the last fitting and the first failing size is
    bisected. Assumes the peak grows with the batch size.
    """
    tried: list[tuple[int, int | None]] = []

    def fits(b: int) -> int | None:
        try:
            peak: int | None = try_batch(b)
        except torch.cuda.OutOfMemoryError:
            peak = None
        if peak is not None and budget_bytes is not None and peak > budget_bytes:
            tried.append((b, None))
            return None
        tried.append((b, peak))
        return peak

    good, good_peak = 0, None
    bad: int | None = None
    b = max(1, start)
    while b <= limit:
        peak = fits(b)
        if peak is None:
            bad = b
            break
        good, good_peak = b, peak
        b *= 2
    if bad is None:
        return BatchSearch(good, good_peak, tried)
    lo, hi = good, bad  # lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        peak = fits(mid)
        if peak is None:
            hi = mid
        else:
            lo, good_peak = mid, peak
    return BatchSearch(lo, good_peak if lo else None, tried)
