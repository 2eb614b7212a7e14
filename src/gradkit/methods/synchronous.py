"""Backprop as a stage pipeline: the backward-locked reference that decoupled methods are timed against.

Each stage forwards its batch with autograd and sends the output up, then waits for the δ of that same
batch from the stage above, backpropagates it, sends its input gradient down and updates. The result
equals ``bp`` (up to float summation order, which is the same here); what changes is that every stage
is a separate worker that a multi-process executor can place on its own device.
"""

from __future__ import annotations

import torch
from torch import nn

from gradkit.methods._base import LossFn
from gradkit.methods._pipelined import PipelineMethod
from gradkit.pipeline.schedule import Action, Schedule, SynchronousSchedule
from gradkit.pipeline.worker import PipelineError, StageWorker

__all__ = ["SynchronousPipeline", "SynchronousWorker"]


class SynchronousWorker(StageWorker):
    """One stage of the synchronous pipeline: forward, wait for δ, backward, update."""

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss_fn: LossFn) -> None:
        super().__init__(index, num_stages, module, optimizer)
        self.loss_fn = loss_fn
        self.current: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def execute(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if action.op == "forward":
            x = self.input_for_grad(received["activation"])
            out = self.module(x)
            self.current = (action.batch, x, out)
            return {"activation": out.detach()}
        if action.op == "backward":
            if self.current is None or self.current[0] != action.batch:
                raise PipelineError(f"stage {self.index} has no forward of batch {action.batch}")
            _, x, out = self.current
            self.current = None
            self.optimizer.zero_grad(set_to_none=True)
            out.backward(received["delta"])
            return self.input_grad(x)
        if action.op == "update":
            self.update(action.batch)
            return {}
        if action.op == "loss":
            return self.loss_step(action.batch, received, self.loss_fn)
        raise PipelineError(f"the synchronous pipeline has no action {action.op!r}")

    def reset(self) -> None:
        self.current = None


class SynchronousPipeline(PipelineMethod):
    """Backprop split into K stage workers (``bp`` computed the way a stage-parallel executor runs it)."""

    name = "bp-pipeline"
    backward_locked = True

    def make_schedule(self, num_stages: int) -> Schedule:
        return SynchronousSchedule(num_stages)

    def make_worker(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> StageWorker:
        return SynchronousWorker(index, len(self.stages), module, optimizer, loss_fn=self.loss_fn)
