"""Profile each block of an ``nn.Sequential``: forward and backward seconds, bytes of its output.

The one profiler behind time balancing (:func:`gradkit.stages.split` with ``balance="time"``), the
pipeline cost model (:mod:`gradkit.stages.cost_model`) and ``--stages auto``
(:mod:`gradkit.stages.auto`). The approach is torchgpipe's ``balance_by_time`` (Kim et al.,
"torchgpipe: On-the-fly Pipeline Parallelism for Training Giant Models", 2020), with forward and
backward timed apart because pipelined methods do not pay them alike.

Example:
    >>> costs = profile_blocks(model, x, threads=1)
    >>> [c.total_s for c in costs]  # forward + backward seconds per block
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from gradkit.devices import fork_rng
from gradkit.errors import ConfigError
from gradkit.threads import torch_threads

__all__ = ["BlockCost", "profile_blocks"]


@dataclass(frozen=True)
class BlockCost:
    """Profiled cost of one block: median forward and backward seconds, bytes of its output."""

    forward_s: float
    backward_s: float
    output_bytes: int

    @property
    def total_s(self) -> float:
        """Forward plus backward seconds: the block's cost in plain backprop."""
        return self.forward_s + self.backward_s


def profile_blocks(
    model: nn.Sequential, sample: torch.Tensor, *, threads: int | None = None, repeats: int = 3
) -> list[BlockCost]:
    """Median forward and backward seconds and output bytes of each block of ``model`` on ``sample``.

    The sample runs through the blocks in order, in training mode; each block is timed ``repeats``
    times after one untimed warm-up call, and the median is kept. Every block but the first also
    produces its input's gradient (a pipeline stage must send it down), so that is part of its
    backward. Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written and no
    weight changes; this works under a caller's ``torch.no_grad()`` too. Afterwards the model is as
    before: buffers (BatchNorm running statistics) are restored, each module's train/eval mode too,
    the global random state (dropout draws made here do not change a later run) and torch's thread
    count.

    Args:
        model: an ``nn.Sequential`` whose blocks each return one tensor.
        sample: an input batch for the whole model, on the model's device.
        threads: torch intra-op threads while profiling (e.g. one worker process's share of the
            cores); ``None`` keeps the current setting.
        repeats: timed calls per block.

    Returns:
        One :class:`BlockCost` per block. ``output_bytes`` is what a pipeline sends up at a cut after
        the block (and the size of the gradient it gets back).

    Raises:
        ConfigError: ``threads < 1``, ``repeats < 1``, or a block does not return a tensor.
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads must be an int >= 1 or None, got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    # A worker or benchmark profiles once and then trains: it must keep its own thread count.
    with torch_threads(threads):
        return _measure_blocks(model, sample, repeats)


def _measure_blocks(model: nn.Sequential, sample: torch.Tensor, repeats: int) -> list[BlockCost]:
    """Time the blocks with the model's buffers, modes and the random state restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with (
            fork_rng(sample.device),
            torch.enable_grad(),  # a caller's no_grad() would silently drop the backward timing
        ):
            model.train()
            return _time_blocks(model, sample, repeats)
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for m, training in modes:
            m.training = training


def _time_blocks(model: nn.Sequential, sample: torch.Tensor, repeats: int) -> list[BlockCost]:
    results: list[BlockCost] = []
    x = sample.detach()
    for index, (name, block) in enumerate(model.named_children()):
        # The model's input needs no gradient; every later block must also produce its input's
        # gradient in a pipeline, so that is part of its cost.
        if index > 0 and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        params = [p for p in block.parameters() if p.requires_grad]
        inputs = ([x] if x.requires_grad else []) + params
        forwards: list[float] = []
        backwards: list[float] = []
        for r in range(repeats + 1):
            _sync(x)
            start = time.perf_counter()
            y = block(x)
            if not isinstance(y, torch.Tensor):
                raise ConfigError(
                    f"block {name!r} returned {type(y).__name__}, not a tensor; "
                    "profile_blocks needs one tensor per block: use balance='params' or sizes="
                )
            _sync(y)
            middle = time.perf_counter()
            if inputs and y.requires_grad:
                torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
            _sync(y)
            if r > 0:  # the first call pays one-off allocation and kernel selection costs
                forwards.append(middle - start)
                backwards.append(time.perf_counter() - middle)
        output_bytes = y.numel() * y.element_size()
        results.append(
            BlockCost(statistics.median(forwards), statistics.median(backwards), output_bytes)
        )
        x = y.detach()
    return results


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
