"""A pipelined method defined outside gradkit, in one file with one registry line.

"Probe" trains only the last stage on the features the earlier, frozen stages compute (linear
probing, as a pipeline): every stage but the last forwards without a graph; the last computes the loss,
backpropagates into itself and updates. Its schedule, its stage and its cost for the balancer all
live here; ``gradkit.train`` runs it in one process and, with ``workers=2``, one process per stage
(the launcher imports this module in every worker).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradkit.methods import METHODS, PipelineMethod
from gradkit.pipeline import ACTIVATION, DATA, LABEL, Action, Op, PipelineStage, Schedule


class ProbeSchedule(Schedule):
    """Forward up through the frozen stages; the last stage trains; nothing is sent down."""

    name = "toy-probe"

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if not self._exists(step, last_batch):
            return []
        if self._last(stage):
            return [Action(Op.LOSS, step, (self._from_below(stage), (LABEL, DATA))), Action(Op.UPDATE, step)]
        return [Action(Op.FORWARD, step, (self._from_below(stage),), self._up(stage))]

    def drain_steps(self) -> int:
        return 0


class ProbeStage(PipelineStage):
    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if action.op is Op.FORWARD:
            with torch.no_grad():
                return {ACTIVATION: self.module(received[ACTIVATION])}
        raise self.unknown(action)


@METHODS.register("toy-probe", help="train only the last stage on frozen features (a test's toy method)")
class Probe(PipelineMethod):
    name = "toy-probe"

    @classmethod
    def block_seconds(cls, forward_s: float, backward_s: float, *, last: bool,
                      synthesizer_fraction: float = 0.0) -> float:
        return forward_s + backward_s if last else forward_s

    @classmethod
    def schedule_for(cls, num_stages: int, **options: Any) -> Schedule:
        return ProbeSchedule(num_stages)

    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        return ProbeStage(index, len(self.stages), module, optimizer, loss_fn=self.loss_fn)
