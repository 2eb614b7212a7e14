"""Plain backpropagation: the reference every other method is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradkit.methods._base import LossFn, Method
from gradkit.methods._pipelined import PipelineMethod
from gradkit.methods._registry import METHODS
from gradkit.methods.synchronous import SynchronousPipeline
from gradkit.optim import OptimizerFactory

__all__ = ["Backprop"]


@METHODS.register("bp", help="plain backpropagation through all stages (the reference)")
class Backprop(Method):
    """Standard end-to-end backpropagation (Rumelhart et al., 1986) over the chained stages.

    The stages run one after another as one model with one optimizer, so the result does not depend
    on how the model was split: ``bp`` with K stages equals ``bp`` with one.
    """

    name = "bp"

    @classmethod
    def stage_parallel_form(cls) -> type[PipelineMethod]:
        # One process per stage cannot run one optimizer over the whole model: the stages run
        # backprop as a synchronous pipeline instead, which computes the same updates.
        return SynchronousPipeline

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer)
        self._optimizer = self.optimizer_factory(self.parameters())

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.loss_fn(self.forward(x), y)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.update_observers:
            self._notify_update(0, -1, self.parameters())
        self._optimizer.step()
        return loss.item()
