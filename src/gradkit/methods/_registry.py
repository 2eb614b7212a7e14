"""The method registry and the factory that builds a method by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn, Method
from gradkit.methods._pipelined import PipelineMethod
from gradkit.optim import OptimizerFactory
from gradkit.registry import Registry

__all__ = ["METHODS", "build", "check_options", "method_options", "stage_parallel_class", "stage_parallel_names"]

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
    _check_option_names_and_types(name, cls, options, stage_parallel)
    return cls(stages, loss_fn=loss_fn, optimizer=optimizer, **options)


def check_options(name: str, options: dict[str, Any], *, stage_parallel: bool = False) -> None:
    """Reject method options that cannot work before anything is loaded or any worker starts: unknown
    names, values of the wrong type (``warmup_steps=abc``), and the values the method's constructor
    refuses (``synthesizer_hidden=-5``), found by building it on two tiny stages.

    Raises:
        ConfigError: one line naming the option and what it takes.
    """
    cls = _method_class(name, stage_parallel)
    _check_option_names_and_types(name, cls, options, stage_parallel)
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(1, 1)), nn.Sequential(nn.Linear(1, 1))]
    try:
        # Methods check their options before they build optimizers, so the build stops there: a
        # torch optimizer's first use imports torch._dynamo (seconds), and the launcher of a
        # multi-process run would pay that before starting any worker.
        cls(stages, optimizer=_options_checked, **options)
    except ConfigError:
        raise
    except _OptionsChecked:
        pass
    except Exception:  # noqa: BLE001 - tiny stages are not the real model; the real build reports these
        pass


class _OptionsChecked(Exception):
    """Raised where a method being checked asks for its first optimizer."""


def _options_checked(params: object) -> torch.optim.Optimizer:
    raise _OptionsChecked


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_option_names_and_types(name: str, cls: type[Method], options: dict[str, Any],
                                  stage_parallel: bool) -> None:
    accepted = method_options(name, stage_parallel=stage_parallel)
    for option in options:
        if option not in accepted:
            takes = ", ".join(sorted(accepted)) or "no options"
            raise ConfigError(f"method {name!r} does not take option {option!r}; it takes: {takes}")
    params = inspect.signature(cls.__init__).parameters
    for option, value in options.items():
        annotation = params[option].annotation
        if not isinstance(annotation, str):  # annotations are strings under `from __future__ import annotations`
            annotation = getattr(annotation, "__name__", str(annotation))
        kinds = [k.strip() for k in annotation.split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = [t for k in kinds for t in _TYPES.get(k, ())]
        if not allowed or any(k not in _TYPES and k != "None" for k in kinds):
            continue  # a type this check does not know: the method checks it
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, tuple(allowed))
        if not ok:
            wanted = " or ".join(k if k != "None" else "none" for k in kinds)
            raise ConfigError(f"method {name!r} option {option} must be {_article(wanted)}, got {value!r}; "
                              f"e.g. -o {option}={_example(kinds[0])}")


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _example(kind: str) -> str:
    return {"int": "4", "float": "0.5", "bool": "true", "str": "name"}.get(kind, "VALUE")
