"""The model registry and :func:`build_model`, the one way the CLI and benchmarks make a model.

Every builder has the signature ``fn(input_shape, num_classes, *, option=default, ...)`` and returns an
``nn.Sequential`` of named blocks, so that :func:`gradkit.stages.split` can cut it into pipeline stages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from gradkit.errors import ConfigError
from gradkit.registry import Registry

__all__ = ["MODELS", "ModelBuilder", "build_model"]

ModelBuilder = Callable[..., nn.Sequential]

MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Sequential:
    """Build the registered model ``name`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    Nothing is downloaded: weights are freshly initialised.

    Args:
        name: a registered model name (see ``MODELS.names()``).
        input_shape: shape of one example without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of output logits.
        **kwargs: model options (e.g. ``hidden=(128,)`` for ``mlp``, ``shortcut="A"`` for ResNets).

    Returns:
        An ``nn.Sequential`` of named blocks mapping ``(N, *input_shape)`` to ``(N, num_classes)``.

    Raises:
        ConfigError: unknown name, unknown option, or a shape/size the model cannot take.

    Example:
        >>> model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        >>> list(model._modules)
        ['hidden1', 'head']
    """
    builder = MODELS.get(name)
    shape = _check_common(name, input_shape, num_classes)
    accepted = _options(builder)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            choices = ", ".join(accepted) if accepted else "no options"
            raise ConfigError(
                f"unknown option(s) for model {name!r}: {', '.join(unknown)}; "
                f"{name} accepts: {choices}"
            )
    return builder(shape, num_classes, **kwargs)


def _options(builder: ModelBuilder) -> list[str] | None:
    """Names of the keyword options a builder takes, or None if it takes ``**kwargs``."""
    params = list(inspect.signature(builder).parameters.values())[2:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def _check_common(name: str, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"input_shape for model {name!r} must be a tuple of ints such as (3, 32, 32), "
            f"got {input_shape!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"input_shape for model {name!r} must be non-empty with positive sizes, got {shape}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    return shape
