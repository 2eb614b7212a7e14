"""Shared pieces of the forward-only peers of ULR (``es``, ``spsa``, ``forward-grad``)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn, Method
from gradkit.optim import OptimizerFactory

__all__ = ["DirectionalEstimator", "eval_mode_after_clean_pass"]


class DirectionalEstimator(Method):
    """A method that estimates the gradient of all weights from ``directions`` random directions.

    Subclasses implement :meth:`estimate` (fill ``.grad``, return the clean loss); one optimizer over
    every trainable parameter then steps.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None,
        optimizer: OptimizerFactory | None,
        directions: int,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer)
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ConfigError(f"{self.name} option directions must be a positive integer, got {directions!r}")
        self.directions = directions
        self._params = self.parameters()
        self._optimizer = self.optimizer_factory(self._params)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    @abstractmethod
    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` with the estimate without stepping; returns the clean loss."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.estimate(x, y)
        self._optimizer.step()
        return loss


@contextmanager
def eval_mode_after_clean_pass(method: Method, x: torch.Tensor, y: torch.Tensor) -> Iterator[float]:
    """One clean training-mode forward (updates BatchNorm statistics once; yields its loss), then every
    module in eval mode for the perturbed passes, so that they all evaluate one fixed function."""
    with torch.no_grad():
        loss = method.loss_fn(method.forward(x), y).item()
    modes = [(m, m.training) for s in method.stages for m in s.modules()]
    for s in method.stages:
        s.eval()
    try:
        yield loss
    finally:
        for m, training in modes:
            m.training = training
