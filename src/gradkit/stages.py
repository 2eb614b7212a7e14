"""Cut an ``nn.Sequential`` into pipeline stages of consecutive blocks.

A stage is an ``nn.Sequential`` that holds the *same* block modules as the model (no copies) under their
original names, so parameters are shared, optimizers built on the model see the stages' updates, and
each stage's ``state_dict`` keys are a subset of the model's. The split point is chosen by balancing a
per-block cost: the number of blocks, the number of parameters, or the profiled forward+backward time
(the approach of torchgpipe's ``balance_by_time``; Kim et al., "torchgpipe: On-the-fly Pipeline
Parallelism for Training Giant Models", 2020).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [len(s) for s in split(model, 2, balance="count")]
    [3, 2]
    >>> split(model, sizes=[1, 4])[0][0] is model[0]
    True
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError

__all__ = ["BALANCES", "split", "partition", "profile_blocks"]

logger = logging.getLogger(__name__)

#: Names accepted by ``split(balance=...)``.
BALANCES = ("count", "params", "time")


def split(
    model: nn.Sequential,
    k: int | None = None,
    *,
    sizes: Sequence[int] | None = None,
    balance: str = "time",
    sample: torch.Tensor | None = None,
    method: str | None = None,
) -> list[nn.Sequential]:
    """Split ``model`` into stages of consecutive blocks that share the model's modules.

    Give either ``k`` (the number of stages; the cut is chosen by ``balance``) or ``sizes`` (blocks
    per stage, used as given).

    Args:
        model: the model; its children are the blocks.
        k: number of stages, ``1 <= k <= len(model)``.
        sizes: blocks per stage, positive and summing to ``len(model)``.
        balance: how to choose the cut for ``k`` stages, minimising the largest stage's cost:
            ``"count"`` blocks, ``"params"`` parameter elements, ``"time"`` forward+backward time
            profiled on ``sample`` (see :func:`profile_blocks`).
        sample: an input batch for the whole model; needed by ``balance="time"``.
        method: with ``balance="time"``, the pipelined method the stages will run (``"fr"``,
            ``"ddg"``, ``"dni"`` or ``"bp"``): the cut then minimises that method's predicted step
            time, e.g. FR's earlier stages pay an extra replay forward (see
            :func:`gradkit.distributed.cost_model.balanced_sizes`, default link speed). ``None``
            (default) balances plain forward+backward time.

    Returns:
        ``k`` (or ``len(sizes)``) ``nn.Sequential`` stages; chaining them computes ``model``.

    Raises:
        ConfigError: bad ``k``/``sizes``/``balance``/``method``, ``balance="time"`` without
            ``sample``, or ``method`` with a balance other than ``"time"``.

    Example:
        >>> stages = split(model, 2, balance="params")
        >>> y = stages[1](stages[0](x))  # same as model(x)
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"split needs an nn.Sequential of blocks, got {type(model).__name__}; "
            "wrap the model's layers in nn.Sequential (gradkit.models builds them that way)"
        )
    n = len(model)
    if balance not in BALANCES:
        raise ConfigError(f"unknown balance {balance!r}; use one of: {', '.join(BALANCES)}")
    if k is not None and sizes is not None:
        raise ConfigError(f"split got both k={k!r} and sizes={sizes!r}; pass one of them, not both")
    if k is None and sizes is None:
        raise ConfigError(
            "split needs k or sizes: pass k (number of stages, balanced by balance=) "
            "or sizes= (blocks per stage)"
        )
    if sizes is not None:
        sizes = _check_sizes(sizes, n)
    else:
        assert k is not None
        k = _check_k(k, n)
        if method is None:
            sizes = partition(_costs(model, balance, sample), k)
        else:
            sizes = _method_sizes(model, k, balance, sample, method)
        logger.debug("split %d blocks into %s by %s (method %s)", n, sizes, balance, method)

    names = list(model._modules)
    stages: list[nn.Sequential] = []
    start = 0
    for size in sizes:
        stage = nn.Sequential()
        for name in names[start : start + size]:
            # add_module stores a reference: the stage shares the block (and its parameters).
            stage.add_module(name, model._modules[name])
        stages.append(stage)
        start += size
    return stages


def partition(
    costs: Sequence[float],
    k: int,
    *,
    last_costs: Sequence[float] | None = None,
    cut_costs: Sequence[float] | None = None,
) -> list[int]:
    """Sizes of ``k`` non-empty contiguous groups of ``costs`` minimising the largest group's cost.

    A group's cost is the sum of its blocks' ``costs``. Two optional terms generalise it for pipeline
    schedules whose stages do not all work alike (Features Replay's last stage skips the replay
    forward, and every stage pays for the messages at its boundaries):

    - ``last_costs``: the per-block costs used instead of ``costs`` for the *last* group;
    - ``cut_costs[i]``: added to both groups next to a cut between block ``i`` and block ``i + 1``.

    Without them the result is exactly the plain partition. Exact dynamic programme, O(k n^2) for n
    costs. Among the partitions with the smallest maximum it returns the one with the smallest sum of
    squared group costs (the most even overall), and among those the one with the largest earliest
    groups.

    Args:
        costs: non-negative, finite cost of each block.
        k: number of groups, ``1 <= k <= len(costs)``.
        last_costs: optional non-negative cost of each block when it is in the last group.
        cut_costs: optional non-negative cost of each of the ``len(costs) - 1`` possible cuts.

    Returns:
        Group sizes, each >= 1, summing to ``len(costs)``.

    Raises:
        ConfigError: ``k`` out of range, a cost negative or not finite, or an optional cost list of
            the wrong length.

    Example:
        >>> partition([1, 1, 1, 10], 2)
        [3, 1]
        >>> partition([1, 1, 1, 1], 2, last_costs=[0.5] * 4)  # the last group is cheaper per block
        [1, 3]
    """
    values = _check_costs("costs", costs, None)
    n = len(values)
    k = _check_k(k, n)
    last = values if last_costs is None else _check_costs("last_costs", last_costs, n)
    cuts = None if cut_costs is None else _check_costs("cut_costs", cut_costs, max(n - 1, 0))
    prefix = list(itertools.accumulate(values, initial=0.0))
    last_prefix = prefix if last_costs is None else list(itertools.accumulate(last, initial=0.0))

    def cost(i: int, e: int) -> float:
        # Always the same expression, so the bound found below compares exactly with it.
        c = (last_prefix[e] - last_prefix[i]) if e == n else (prefix[e] - prefix[i])
        if cuts is not None:
            # A stage pays for the message at each of its cuts (the one below and the one above).
            c += (cuts[i - 1] if i > 0 else 0.0) + (cuts[e - 1] if e < n else 0.0)
        return c

    # best[j][i]: smallest possible maximum when blocks i..n-1 form j groups.
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    best[0][n] = 0.0
    for j in range(1, k + 1):
        for i in range(n - j, -1, -1):
            best[j][i] = min(max(cost(i, e), best[j - 1][e]) for e in range(i + 1, n - j + 2))
    bound = best[k][0]

    # Second pass: the most even partition whose groups all stay within the optimal bound.
    sq = [[inf] * (n + 1) for _ in range(k + 1)]
    nxt = [[-1] * (n + 1) for _ in range(k + 1)]
    sq[0][n] = 0.0
    for j in range(1, k + 1):
        for i in range(n - j, -1, -1):
            # Largest first group first, so ties keep the earlier groups larger.
            for e in range(n - j + 1, i, -1):
                c = cost(i, e)
                if c > bound or sq[j - 1][e] == inf:
                    continue
                total = c * c + sq[j - 1][e]
                if total < sq[j][i]:
                    sq[j][i], nxt[j][i] = total, e
    return sizes_from_cuts(nxt, k)


def sizes_from_cuts(nxt: Sequence[Sequence[int]], k: int) -> list[int]:
    """Group sizes from a partition DP's table: ``nxt[j][i]`` is where the group starting at block
    ``i`` ends when ``j`` groups remain."""
    sizes, i = [], 0
    for j in range(k, 0, -1):
        e = nxt[j][i]
        sizes.append(e - i)
        i = e
    return sizes


def _check_costs(name: str, costs: Sequence[float], n: int | None) -> list[float]:
    values = [float(c) for c in costs]
    if n is not None and len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries, need {n} (one per block or cut)")
    bad = [c for c in values if not math.isfinite(c) or c < 0]
    if bad:
        raise ConfigError(
            f"{name} must be finite and >= 0, got {bad[0]!r}; pass one cost per block"
        )
    return values


def profile_blocks(model: nn.Sequential, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward time in seconds of each block of ``model`` on ``sample``.

    The sample runs through the blocks in order, in training mode; each block is timed ``repeats``
    times after one untimed warm-up call, and the median is kept. Gradients are taken with
    ``torch.autograd.grad``, so no ``.grad`` is written. Afterwards the model is as before: buffers
    (BatchNorm running statistics) are restored, each module's train/eval mode too, and the global
    random state, so dropout draws made here do not change a later run.
    (:func:`gradkit.distributed.cost_model.profile_block_costs` gives forward and backward apart.)

    Args:
        model: an ``nn.Sequential`` whose blocks each return one tensor.
        sample: an input batch for the whole model, on the model's device.
        repeats: timed calls per block.

    Returns:
        One time per block, in seconds.

    Raises:
        ConfigError: ``repeats < 1``, or a block does not return a tensor.
    """
    return [forward + backward for forward, backward, _ in measure_blocks(model, sample, repeats)]


def measure_blocks(
    model: nn.Sequential, sample: torch.Tensor, repeats: int = 3
) -> list[tuple[float, float, int]]:
    """``(forward_s, backward_s, output_bytes)`` of each block; the shared core of the profilers.

    Same procedure and guarantees as :func:`profile_blocks` (which sums the two times): median of
    ``repeats`` timed calls after a warm-up, and the model, its buffers and the random state are left
    as they were.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    device = sample.device
    on_cpu = device.type == "cpu"
    try:
        with (
            torch.random.fork_rng(
                devices=[] if on_cpu else [device], device_type=None if on_cpu else device.type
            ),
            torch.enable_grad(),  # a caller's no_grad() would silently drop the backward timing
        ):
            model.train()
            return _profile(model, sample, repeats)
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for m, training in modes:
            m.training = training


def _profile(
    model: nn.Sequential, sample: torch.Tensor, repeats: int
) -> list[tuple[float, float, int]]:
    results: list[tuple[float, float, int]] = []
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
        # The output is what a pipeline sends up at a cut after this block (and the δ it gets back).
        output_bytes = y.numel() * y.element_size()
        results.append((statistics.median(forwards), statistics.median(backwards), output_bytes))
        x = y.detach()
    return results


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _costs(model: nn.Sequential, balance: str, sample: torch.Tensor | None) -> list[float]:
    if balance == "count":
        return [1.0] * len(model)
    if balance == "params":
        return [float(sum(p.numel() for p in block.parameters())) for block in model]
    if balance == "time":
        if sample is None:
            raise ConfigError(
                "balance='time' profiles each block on an input batch: pass sample=<a batch of "
                "inputs>, or use balance='params' (or 'count')"
            )
        return profile_blocks(model, sample)
    raise ConfigError(f"unknown balance {balance!r}; use one of: {', '.join(BALANCES)}")


def _method_sizes(
    model: nn.Sequential, k: int, balance: str, sample: torch.Tensor | None, method: str
) -> list[int]:
    # Imported here: the cost model builds on this module (its profiler and partition).
    from gradkit.distributed import cost_model

    cost_model.check_method(method)
    if balance != "time":
        raise ConfigError(
            f"method={method!r} balances by the method's predicted step time, which needs "
            f"balance='time' (got {balance!r}); use balance='time' with sample=, or drop method="
        )
    if sample is None:
        raise ConfigError(
            f"method={method!r} profiles each block on an input batch: pass sample=<a batch of "
            "inputs>, or drop method= and use balance='params' (or 'count')"
        )
    return cost_model.balanced_sizes(cost_model.profile_block_costs(model, sample), k, method)


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer type (numpy ints too), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_k(k: int, n: int) -> int:
    k_int = _as_int(k)
    if k_int is None:
        raise ConfigError(f"k must be an int number of stages, got {k!r}; use 1 <= k <= {n}")
    k = k_int
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}; use k between 1 and {max(n, 1)}")
    if k > n:
        raise ConfigError(f"cannot split {n} blocks into {k} stages; use k <= {n}")
    return k


def _check_sizes(sizes: Sequence[int], n: int) -> list[int]:
    try:
        given = list(sizes)
    except TypeError:
        raise ConfigError(
            f"sizes must be a list of blocks per stage summing to {n}, got {sizes!r}"
        ) from None
    if not given:
        raise ConfigError(f"sizes is empty; give blocks per stage summing to {n}, e.g. [{n}]")
    ints = [_as_int(s) for s in given]
    if any(s is None for s in ints):
        raise ConfigError(f"sizes must be ints (blocks per stage), got {given}")
    sizes = [int(s) for s in ints]  # type: ignore[arg-type]
    if any(s < 1 for s in sizes):
        raise ConfigError(
            f"sizes must all be >= 1, got {sizes}; every stage needs at least one block"
        )
    if sum(sizes) != n:
        raise ConfigError(
            f"sizes {sizes} sum to {sum(sizes)} but the model has {n} blocks; make them sum to {n}"
        )
    return sizes


def check_stage_sizes(config: Any, blocks: int) -> list[int]:
    """``config.stage_sizes`` as a list, checked against the model's ``blocks``.

    Raises:
        ConfigError: the sizes do not add up to the number of blocks.
    """
    sizes = list(config.stage_sizes)
    if sum(sizes) != blocks:
        raise ConfigError(
            f"--stage-sizes {','.join(map(str, sizes))} adds up to {sum(sizes)} blocks but {config.model} "
            f"has {blocks}; give block counts that sum to {blocks}"
        )
    return sizes
