"""The model registry and :func:`build_model`, the one way the CLI and benchmarks make a model.

Every builder has the signature ``fn(input_shape, num_classes, *, option=default, ...)`` and returns an
``nn.Sequential`` of named blocks, so that :func:`gradkit.stages.split` can cut it into pipeline stages.
A user's own model is such a factory, given by import path (``"mymodels:build"``) or, in Python, as
the callable itself; :func:`build_model` is the one place that resolves and checks it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from gradkit.errors import ConfigError
from gradkit.registry import Registry, is_import_path

__all__ = ["MODELS", "ModelBuilder", "build_model", "model_label"]

ModelBuilder = Callable[..., nn.Sequential]

MODELS: Registry[ModelBuilder] = Registry("model")


def model_label(model: str | ModelBuilder) -> str:
    """How a model is named in messages: its registered name or import path, or a callable's name."""
    if isinstance(model, str):
        return model
    return str(getattr(model, "__qualname__", None) or getattr(model, "__name__", None) or model)


def build_model(
    name: str | ModelBuilder, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Sequential:
    """Build model ``name`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    ``name`` is a registered name, an import path ``"package.module:factory"`` or a factory itself.
    The factory contract (the same for registered builders)::

        factory(input_shape: tuple[int, ...], num_classes: int, **model_args) -> nn.Sequential

    where the ``nn.Sequential``'s children are the blocks :func:`gradkit.stages.split` distributes
    over pipeline stages, and ``model_args`` are the dataset's ``Dataset.model_args`` (a text set's
    ``vocab_size``) plus the run's ``--model-option`` values. Nothing is downloaded: weights are
    freshly initialised.

    Args:
        name: a registered model name (see ``MODELS.names()``), ``"package.module:factory"``, or a
            factory callable.
        input_shape: shape of one example without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of output logits.
        **kwargs: model options (e.g. ``hidden=(128,)`` for ``mlp``, ``shortcut="A"`` for ResNets).

    Returns:
        An ``nn.Sequential`` of named blocks mapping ``(N, *input_shape)`` to ``(N, num_classes)``
        (``(N, T, num_classes)`` for a next-token model such as ``gpt``).

    Raises:
        ConfigError: unknown name; an import path whose module does not import, lacks the attribute
            or names something not callable; unknown option; a shape/size the model cannot take; a
            factory that returns something other than an ``nn.Sequential``.

    Example:
        >>> model = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        >>> list(model._modules)
        ['hidden1', 'head']
    """
    label = model_label(name)
    if isinstance(name, str):
        builder = MODELS.get(name)
    elif callable(name):
        builder = name
    else:
        raise ConfigError(f"model must be a registered name, 'package.module:factory' or a callable, got {name!r}")
    shape = _check_common(label, input_shape, num_classes)
    accepted = _options(builder)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            choices = ", ".join(accepted) if accepted else "no options"
            raise ConfigError(
                f"unknown option(s) for model {label!r}: {', '.join(unknown)}; "
                f"{label} accepts: {choices}"
            )
    model = builder(shape, num_classes, **kwargs)
    if not isinstance(model, nn.Sequential):
        user = " (your factory)" if not isinstance(name, str) or is_import_path(name) else ""
        raise ConfigError(
            f"model {label!r}{user} returned a {type(model).__name__}, not an nn.Sequential: wrap your "
            "model's layers in nn.Sequential(...): gradkit splits it between blocks"
        )
    return model


def _options(builder: ModelBuilder) -> list[str] | None:
    """Names of the keyword options a builder takes, or None if it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(builder).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself complain
        return None
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
