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

A parameter that blocks in two stages share (a tied embedding, a block used twice) is then held by both
stages; :func:`shared_parameters` lists such parameters and the stages that use them, and the
pipelined methods update each once with the sum of its uses' gradients (:mod:`gradkit.pipeline.shared`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.config import BALANCES
from gradkit.errors import ConfigError
from gradkit.pipeline.shared import SharedParameter, shared_parameters
from gradkit.stages import cost_model
from gradkit.stages.partition import _as_int, check_k, partition
from gradkit.stages.profile import profile_blocks

__all__ = ["BALANCES", "SharedParameter", "check_stage_sizes", "choose_sizes", "shared_parameters", "split"]

logger = logging.getLogger(__name__)

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
            profiled on ``sample`` (see :func:`~gradkit.stages.profile_blocks`).
        sample: an input batch for the whole model; needed by ``balance="time"``.
        method: with ``balance="time"``, the stage-parallel method the stages will run (a name
            from :func:`gradkit.methods.stage_parallel_names`, e.g. ``"fr"``; ``"bp"`` means its
            synchronous pipeline): the cut then minimises that method's predicted step time, e.g.
            FR's earlier stages pay an extra replay forward (see
            :func:`gradkit.stages.cost_model.balanced_sizes`, default link speed). ``None``
            (default) balances plain forward+backward time.

    Returns:
        ``k`` (or ``len(sizes)``) ``nn.Sequential`` stages; chaining them computes ``model``.
        ``shared_parameters(stages)`` names the parameters that several of them hold.

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
        k = check_k(k, n)
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
    for s in shared_parameters(stages):
        logger.debug("parameter %s is shared by stages %s", s.names[0], s.stages)
    return stages


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
        return [c.total_s for c in profile_blocks(model, sample)]
    raise ConfigError(f"unknown balance {balance!r}; use one of: {', '.join(BALANCES)}")


def _method_sizes(
    model: nn.Sequential, k: int, balance: str, sample: torch.Tensor | None, method: str
) -> list[int]:
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
    return cost_model.balanced_sizes(profile_blocks(model, sample), k, method)


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
    return _check_stage_sizes(config.stage_sizes, blocks, config.model)


def _check_stage_sizes(stage_sizes: Sequence[int], blocks: int, model_name: str) -> list[int]:
    sizes = list(stage_sizes)
    if sum(sizes) != blocks:
        raise ConfigError(
            f"--stage-sizes {','.join(map(str, sizes))} adds up to {sum(sizes)} blocks but {model_name} "
            f"has {blocks}; give block counts that sum to {blocks}"
        )
    return sizes


def choose_sizes(
    model: nn.Sequential,
    *,
    stages: int,
    balance: str,
    stage_sizes: Sequence[int] | None,
    sample: torch.Tensor | None,
    method: str | None,
    model_name: str,
) -> list[int]:
    """Blocks per stage for a training run's ``--stages``, ``--balance`` and ``--stage-sizes``.

    ``stage_sizes`` (if given) is used as given once it adds up to the model's blocks; one stage is
    the whole model; otherwise :func:`split` balances ``stages`` stages by ``balance``. With
    ``balance="time"`` the blocks are profiled on ``sample``, and if ``method`` is given the cut
    minimises that stage-parallel method's predicted step (:mod:`gradkit.stages.cost_model`; e.g.
    FR's earlier stages pay the replay forward); ``method`` is ignored by the other balances.

    Args:
        model: the model; its children are the blocks.
        stages: the number of stages K (>= 1).
        balance: one of :data:`BALANCES`.
        stage_sizes: ``--stage-sizes``, or None/empty to balance.
        sample: a training batch on the model's device; needed only when ``balance == "time"``.
        method: the stage-parallel method the stages will run (a name from
            :func:`gradkit.methods.stage_parallel_names`), or None to balance plain forward+backward
            time. Pass None for a method that runs the stages in one process without a pipeline
            schedule.
        model_name: the model's name in error messages (``--model``).

    Raises:
        ConfigError: ``stages`` is more than the model's blocks, ``stage_sizes`` does not add up to
            them, or :func:`split` rejects the balance, the method or a missing sample.
    """
    blocks = len(model)
    if stages > blocks:
        raise ConfigError(
            f"--stages {stages} is more than the {blocks} blocks of {model_name}; use --stages <= {blocks}"
        )
    if stage_sizes:
        return _check_stage_sizes(stage_sizes, blocks, model_name)
    if stages == 1:
        return [blocks]
    timed = balance == "time"
    parts = split(model, stages, balance=balance, sample=sample if timed else None,
                  method=method if timed else None)
    return [len(s) for s in parts]
