"""Backprop as a stage pipeline: the backward-locked reference that decoupled methods are timed against.

Each stage forwards its batch with autograd and sends the output up, then waits for the δ of that same
batch from the stage above, backpropagates it, sends its input gradient down and updates. The result
equals ``bp`` (up to float summation order, which is the same here); what changes is that every stage
is a separate worker that a multi-process executor can place on its own device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradkit.methods._base import LossFn
from gradkit.methods._pipelined import PipelineMethod
from gradkit.pipeline.schedule import DELTA, Action, Op, Schedule
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["SynchronousPipeline", "SynchronousSchedule", "SynchronousStage"]


class SynchronousSchedule(Schedule):
    """Backprop split into stages: forward up, backward down, then every stage updates."""

    name = "bp"

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if self._last(stage):
            return self._loss_actions(step, stage, last_batch)
        if not self._exists(step, last_batch):
            return []
        return [
            Action(Op.FORWARD, step, (self._from_below(stage),), self._up(stage)),
            Action(Op.BACKWARD, step, ((DELTA, stage + 1),), self._down(stage)),
            Action(Op.UPDATE, step),
        ]

    def drain_steps(self) -> int:
        return 0


class SynchronousStage(PipelineStage):
    """One stage of the synchronous pipeline: forward, wait for δ, backward, update."""

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss_fn: LossFn) -> None:
        super().__init__(index, num_stages, module, optimizer, loss_fn=loss_fn)
        self.current: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if action.op is Op.FORWARD:
            x = self.input_for_grad(received["activation"])
            out = self.module(x)
            self.current = (action.batch, x, out)
            return {"activation": out.detach()}
        if action.op is Op.BACKWARD:
            if self.current is None or self.current[0] != action.batch:
                raise PipelineError(f"stage {self.index} has no forward of batch {action.batch}")
            _, x, out = self.current
            self.current = None
            self.optimizer.zero_grad(set_to_none=True)
            out.backward(received[DELTA])
            return self.input_grad(x)
        raise self.unknown(action)

    def reset(self) -> None:
        self.current = None


class SynchronousPipeline(PipelineMethod):
    """Backprop split into K stage workers (``bp`` computed the way a stage-parallel executor runs it)."""

    name = "bp-pipeline"
    backward_locked = True

    @classmethod
    def schedule_for(cls, num_stages: int, **options: Any) -> Schedule:
        return SynchronousSchedule(num_stages)

    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        return SynchronousStage(index, len(self.stages), module, optimizer, loss_fn=self.loss_fn)
