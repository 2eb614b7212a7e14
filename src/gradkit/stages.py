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

import logging
import math
import operator
import statistics
import time
from collections.abc import Sequence

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

    Returns:
        ``k`` (or ``len(sizes)``) ``nn.Sequential`` stages; chaining them computes ``model``.

    Raises:
        ConfigError: bad ``k``/``sizes``/``balance``, or ``balance="time"`` without ``sample``.

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
        sizes = partition(_costs(model, balance, sample), k)
        logger.debug("split %d blocks into %s by %s", n, sizes, balance)

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


def partition(costs: Sequence[float], k: int) -> list[int]:
    """Sizes of ``k`` non-empty contiguous groups of ``costs`` minimising the largest group's sum.

    Exact dynamic programme, O(k n^2) for n costs. Among the partitions with the smallest maximum it
    returns the one with the smallest sum of squared group costs (the most even overall), and among
    those the one with the largest earliest groups.

    Args:
        costs: non-negative, finite cost of each block.
        k: number of groups, ``1 <= k <= len(costs)``.

    Returns:
        Group sizes, each >= 1, summing to ``len(costs)``.

    Raises:
        ConfigError: ``k`` out of range, or a cost negative or not finite.

    Example:
        >>> partition([1, 1, 1, 10], 2)
        [3, 1]
    """
    values = [float(c) for c in costs]
    n = len(values)
    k = _check_k(k, n)
    bad = [c for c in values if not math.isfinite(c) or c < 0]
    if bad:
        raise ConfigError(f"costs must be finite and >= 0, got {bad[0]!r}; pass one cost per block")
    prefix = [0.0]
    for c in values:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:
        # Always the same expression, so the bound found below compares exactly with it.
        return prefix[j] - prefix[i]

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
    sizes, i = [], 0
    for j in range(k, 0, -1):
        e = nxt[j][i]
        sizes.append(e - i)
        i = e
    return sizes


def profile_blocks(model: nn.Sequential, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward time in seconds of each block of ``model`` on ``sample``.

    The sample runs through the blocks in order, in training mode; each block is timed ``repeats``
    times after one untimed warm-up call, and the median is kept. Gradients are taken with
    ``torch.autograd.grad``, so no ``.grad`` is written. Afterwards the model is as before: buffers
    (BatchNorm running statistics) are restored, each module's train/eval mode too, and the global
    random state, so dropout draws made here do not change a later run.

    Args:
        model: an ``nn.Sequential`` whose blocks each return one tensor.
        sample: an input batch for the whole model, on the model's device.
        repeats: timed calls per block.

    Returns:
        One time per block, in seconds.

    Raises:
        ConfigError: ``repeats < 1``, or a block does not return a tensor.
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


def _profile(model: nn.Sequential, sample: torch.Tensor, repeats: int) -> list[float]:
    times: list[float] = []
    x = sample.detach()
    for index, (name, block) in enumerate(model.named_children()):
        # The model's input needs no gradient; every later block must also produce its input's
        # gradient in a pipeline, so that is part of its cost.
        if index > 0 and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        params = [p for p in block.parameters() if p.requires_grad]
        inputs = ([x] if x.requires_grad else []) + params
        samples = []
        for r in range(repeats + 1):
            _sync(x)
            start = time.perf_counter()
            y = block(x)
            if not isinstance(y, torch.Tensor):
                raise ConfigError(
                    f"block {name!r} returned {type(y).__name__}, not a tensor; "
                    "profile_blocks needs one tensor per block: use balance='params' or sizes="
                )
            if inputs and y.requires_grad:
                torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
            _sync(y)
            if r > 0:  # the first call pays one-off allocation and kernel selection costs
                samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples))
        x = y.detach()
    return times


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
