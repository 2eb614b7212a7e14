"""``--precision``: the arithmetic of a training step (fp32, or bf16 autocast).

``bf16`` runs every method's step under ``torch.autocast(device_type, dtype=torch.bfloat16)``: matrix
products and convolutions compute in bfloat16 from fp32 master weights (autocast's cast copies), ops
autocast keeps in fp32 (``cross_entropy``, ``mse_loss``, softmax) stay fp32, so the loss is fp32. The
weights, optimizer state and gradients applied to the weights stay fp32. Like ``--activations``,
every backend applies it in one place, by wrapping the method's step and ``flush``
(:meth:`Precision.wrap`); evaluation runs in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

from gradkit.errors import ConfigError

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""Name -> the autocast dtype (None: no autocast)."""

P = ParamSpec("P")
R = TypeVar("R")


class Precision:
    """One ``--precision`` on one device: ``step = Precision("bf16", device).wrap(method.step)``.

    Raises:
        ConfigError: an unknown name.
    """

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu") -> None:
        if name not in PRECISIONS:
            raise ConfigError(f"unknown --precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
        self.name = name
        self.dtype = PRECISIONS[name]
        self.device_type = torch.device(device).type

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Autocast for bf16; nothing for fp32."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` run under this precision (``fp32`` returns ``fn`` itself)."""
        if self.dtype is None:
            return fn

        @functools.wraps(fn)
        def within(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.context():
                return fn(*args, **kwargs)

        return within
