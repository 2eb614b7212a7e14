"""The method registry and the factory that builds a method by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn, Method
from gradkit.methods._pipelined import PipelineMethod
from gradkit.optim import OptimizerFactory
from gradkit.registry import Registry

__all__ = ["METHODS", "build", "method_options", "stage_parallel_class", "stage_parallel_names"]

METHODS: Registry[type[Method]] = Registry("method")


def method_options(name: str, *, stage_parallel: bool = False) -> set[str]:
    """The method-specific options (keyword-only constructor arguments) method ``name`` takes
    (in its stage-parallel form with ``stage_parallel=True``)."""
    cls = _method_class(name, stage_parallel)
    return {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("loss_fn", "optimizer")
    }


def stage_parallel_class(name: str) -> type[PipelineMethod] | None:
    """The class that runs method ``name`` with one process per stage, or None if it cannot.

    ``fr``, ``ddg`` and ``dni`` are their own; ``bp`` maps to its synchronous pipeline.

    Raises:
        ConfigError: the name is unknown.
    """
    form = METHODS.get(name).stage_parallel_form()
    assert form is None or issubclass(form, PipelineMethod), f"{name}: {form} is not a PipelineMethod"
    return form


def stage_parallel_names() -> list[str]:
    """Registered methods that can run one process per stage (``--workers``, the balancer)."""
    return [name for name in METHODS.names() if stage_parallel_class(name) is not None]


def _method_class(name: str, stage_parallel: bool) -> type[Method]:
    if not stage_parallel:
        return METHODS.get(name)
    cls = stage_parallel_class(name)
    if cls is None:
        raise ConfigError(f"method {name!r} needs the whole model in one process; with one process per "
                          f"stage use one of: {', '.join(stage_parallel_names())}")
    return cls


def build(
    name: str,
    stages: Sequence[nn.Module],
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = None,
    stage_parallel: bool = False,
    **options: Any,
) -> Method:
    """Build the registered method ``name`` on ``stages``.

    Example:
        >>> stages = gradkit.split(model, 2, balance="count")
        >>> method = gradkit.methods.build("bp", stages, optimizer=OptimizerConfig(lr=0.1).factory())
        >>> loss = method.step(x, y)

    Args:
        name: a name from ``METHODS.names()``.
        stages: consecutive partitions of a model (``gradkit.split``).
        loss_fn: loss on (output, target); cross-entropy by default.
        optimizer: factory ``params -> Optimizer``; SGD with Nesterov momentum by default.
        stage_parallel: build the form that runs one process per stage (``bp``: its synchronous
            pipeline; see :func:`stage_parallel_class`).
        **options: method-specific options.

    Raises:
        ConfigError: the name is unknown, or an option is not one the method takes.
    """
    cls = _method_class(name, stage_parallel)
    accepted = method_options(name, stage_parallel=stage_parallel)
    for option in options:
        if option not in accepted:
            takes = ", ".join(sorted(accepted)) or "no options"
            raise ConfigError(f"method {name!r} does not take option {option!r}; it takes: {takes}")
    return cls(stages, loss_fn=loss_fn, optimizer=optimizer, **options)
