"""What one pipeline stage does: the interface every decoupled method's stage implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import PipelineError
from gradkit.pipeline.schedule import DELTA, Action, Op

__all__ = ["PipelineError", "PipelineStage", "UpdateObserver"]

UpdateObserver = Callable[[int, int, Sequence[nn.Parameter]], None]
"""Called as ``observer(stage, batch, params)`` just before a stage's optimizer step, with the
gradients about to be applied in ``p.grad`` (used by the direction diagnostics)."""


class PipelineStage(ABC):
    """One stage of a pipeline: its module, its optimizer and its in-flight buffers.

    A stage executes the actions of a :class:`~gradkit.pipeline.schedule.Schedule` one at a time:
    :meth:`execute` gets the messages the action consumes (by kind) and returns those it sends. It never
    talks to other stages itself, so the same object runs in one process or in one process per stage
    (the split of torch pipelining's ``PipelineStage`` and ``Schedule``).

    Subclasses implement :meth:`run` for their own ops; :data:`Op.UPDATE` and :data:`Op.LOSS` are
    handled here.

    Args:
        loss_fn: ``loss_fn(output, target)`` for the last stage's :data:`Op.LOSS`.
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module,
                 optimizer: torch.optim.Optimizer, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.index = index
        self.num_stages = num_stages
        self.module = module
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.observers: list[UpdateObserver] = []
        self.last_loss: float | None = None
        """Loss of the most recent ``loss`` action (last stage only)."""

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def execute(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``action`` with the messages it consumes; return the messages it sends, by kind."""
        if action.op is Op.UPDATE:
            self.update(action.batch)
            return {}
        if action.op is Op.LOSS:
            return self.loss_step(received)
        return self.run(action, received)

    @abstractmethod
    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own ops (everything but update and loss)."""

    def unknown(self, action: Action) -> PipelineError:
        """The error for an op this stage does not handle (a schedule bug)."""
        return PipelineError(f"{type(self).__name__} has no action {action.op}")

    # -- shared pieces ------------------------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        """The parameters this stage's optimizer updates: its trainable ones, less any that other
        stages use too (those are updated once, after the step: :mod:`gradkit.pipeline.shared`)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def update(self, batch: int) -> None:
        """Optimizer step with the gradients in ``p.grad`` (observers see them first)."""
        for observer in self.observers:
            observer(self.index, batch, self.params())
        self.optimizer.step()

    def input_for_grad(self, x: torch.Tensor) -> torch.Tensor:
        """A leaf copy of a received input; it needs a gradient only if there is a stage below."""
        return x.detach().requires_grad_(self.index > 0)

    @staticmethod
    def input_grad(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not x.requires_grad:
            return {}
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        return {DELTA: grad}

    def loss_step(self, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The last stage: forward with autograd, loss, backward; δ of the input goes down."""
        x = self.input_for_grad(received["activation"])
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.module(x), received["label"])
        loss.backward()
        self.last_loss = loss.item()
        return self.input_grad(x)

    # -- memory and persistence ---------------------------------------------------------------------
    def buffers(self) -> dict[str, list[torch.Tensor]]:
        """Tensors held between steps, by category (e.g. ``{"fifo": [...]}``)."""
        return {}

    def buffer_state(self) -> dict[str, Any]:
        """In-flight state to checkpoint (weights and optimizer are saved by the method)."""
        return {}

    def load_buffer_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`buffer_state` returned."""
        return None

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers besides the stage's own (e.g. DNI's synthesizer)."""
        return []

    def reset(self) -> None:
        """Forget in-flight work (after the pipeline was drained)."""
        return None
