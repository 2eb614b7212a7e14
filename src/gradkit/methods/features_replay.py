"""Features Replay (Huo, Gu, Huang: "Training Neural Networks Using Features Replay", NeurIPS 2018).

Stage k < K-1 keeps only its last K-k *inputs*. Each iteration it plays the newest input forward
without a graph, then replays the oldest input with its current weights and backpropagates the error
gradient δ that stage k+1 computed for that batch one iteration earlier (Algorithm 1). Stages never
wait for the backward pass of the stages above them, and memory stays O(L + K²) (Table 1) because
no graph outlives its iteration. The last stage never replays; with K=1 this is exactly backprop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn, scale_lr
from gradkit.methods._pipelined import PipelineMethod
from gradkit.methods._registry import METHODS
from gradkit.methods._staleness import AUTO
from gradkit.optim import OptimizerFactory
from gradkit.pipeline.batchnorm import BN_POLICIES, frozen_running_stats
from gradkit.pipeline.schedule import DELTA, Action, Op, Schedule
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["FeaturesReplay", "ReplaySchedule", "ReplayStage"]


class ReplaySchedule(Schedule):
    """Features Replay: play batch t, replay batch t-(K-1-k) against the stale δ (Algorithm 1).

    Stage k < K-1 *plays* batch t without a graph, then *replays* batch t-(K-1-k) with its current
    weights and the stale error gradient δ that stage k+1 sent in the previous step, then updates.
    The last stage runs batch t with autograd. Stage k neither replays nor updates during its first
    K-1-k steps (the reference's warm-up; the paper's "zero features" would let weight decay and
    momentum move the weights).
    """

    name = "fr"
    forward_op, backward_op = Op.PLAY, Op.REPLAY

    def delay(self, stage: int) -> int:
        """How many steps old the batch that ``stage`` trains on is: K-1-k."""
        return self.num_stages - 1 - stage

    def first_update(self, stage: int) -> int:
        return self.delay(stage)

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if self._last(stage):
            return self._loss_actions(step, stage, last_batch)
        out = []
        if self._exists(step, last_batch):
            out.append(Action(self.forward_op, step, (self._from_below(stage),), self._up(stage)))
        old = step - self.delay(stage)
        if self._exists(old, last_batch):
            out.append(Action(self.backward_op, old, ((DELTA, stage + 1),), self._down(stage)))
            out.append(Action(Op.UPDATE, old))
        return out

    def drain_steps(self) -> int:
        return self.num_stages - 1


class ReplayStage(PipelineStage):
    """One Features Replay stage: a FIFO of inputs, play, replay, update."""

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss_fn: LossFn, bn_policy: str) -> None:
        super().__init__(index, num_stages, module, optimizer, loss_fn=loss_fn)
        self.bn_policy = bn_policy
        self.fifo: deque[tuple[int, torch.Tensor]] = deque()

    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if action.op is Op.PLAY:
            x = received["activation"].detach()
            with torch.no_grad():
                out = self.module(x)
            self.fifo.append((action.batch, x))
            return {"activation": out}
        if action.op is Op.REPLAY:
            return self._replay(action.batch, received[DELTA])
        raise self.unknown(action)

    def _replay(self, batch: int, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        stored, x = self.fifo.popleft()
        if stored != batch:
            raise PipelineError(f"stage {self.index} replays batch {batch} but its oldest input is batch {stored}")
        x = self.input_for_grad(x)
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_running_stats(self.module, enabled=self.bn_policy == "play"):
            out = self.module(x)
        out.backward(delta)
        return self.input_grad(x)

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {"fifo": [x for _, x in self.fifo]}

    def buffer_state(self) -> dict[str, Any]:
        return {"fifo": [(b, x) for b, x in self.fifo]}

    def load_buffer_state(self, state: dict[str, Any]) -> None:
        self.fifo = deque((b, x) for b, x in state["fifo"])

    def reset(self) -> None:
        self.fifo.clear()


@METHODS.register("fr", help="Features Replay: stages update in parallel by replaying stored inputs (Huo et al. 2018)")
class FeaturesReplay(PipelineMethod):
    """Features Replay over K stages.

    Args:
        stages, loss_fn, optimizer: see :class:`~gradkit.methods.Method`; each stage gets its own
            optimizer from the factory.
        bn_policy: ``"play"`` (default: only the play forward updates BatchNorm running statistics)
            or ``"reference"`` (play and replay both update them, as the reference code does).
        double_first_lr: double the first stage's learning rate, a quirk of the reference code.
        record_timeline: keep every executed action in ``executor.timeline``.
        stale_lr: ``none``, ``inverse`` or ``sqrt``: stage k's learning rate divided by ``1+τ`` or
            ``sqrt(1+τ)``, τ = K-1-k the age of its gradients (:data:`gradkit.methods._staleness.STALE_LR`);
            default ``auto``: ``inverse`` for a stage that hands on a sequence ``(N, T, C)``, ``none``
            (the paper's rule) elsewhere (:mod:`gradkit.methods._staleness`).
        clip_grad_norm: clip each stage's gradient to this norm before its update (0: off).
        stale_momentum: Adam's β1 (SGD's momentum) for the stages whose gradients are stale (all but
            the last), or None for the optimizer's (:func:`gradkit.methods._staleness.set_stale_momentum`);
            default ``auto``: 0.5 for a stage that hands on a sequence, the optimizer's elsewhere.

    Example:
        >>> method = gradkit.methods.build("fr", gradkit.split(model, 3), optimizer=factory)
        >>> for x, y in batches:
        ...     loss = method.step(x, y)
        >>> method.flush()  # finish the K-1 batches still in flight
    """

    name = "fr"

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        bn_policy: str = "play",
        double_first_lr: bool = False,
        record_timeline: bool = False,
        stale_lr: str = AUTO,
        clip_grad_norm: float = 0.0,
        stale_momentum: float | str | None = AUTO,
    ) -> None:
        if bn_policy not in BN_POLICIES:
            raise ConfigError(f"unknown bn_policy {bn_policy!r}; choose one of: {', '.join(BN_POLICIES)}")
        self.bn_policy = bn_policy
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, record_timeline=record_timeline,
                         stale_lr=stale_lr, clip_grad_norm=clip_grad_norm, stale_momentum=stale_momentum)
        if double_first_lr and len(self.stages) > 1:
            # A scale of the stage's steps, not a new base rate: a --resume with another --lr (which
            # sets every group's base rate) keeps the doubling, as it keeps stale_lr's scales.
            for group in self.pipeline_stages[0].optimizer.param_groups:
                scale_lr(group, 2.0)

    @classmethod
    def block_seconds(cls, forward_s: float, backward_s: float, *, last: bool,
                      synthesizer_fraction: float = 0.0) -> float:
        # Every stage but the last plays the new batch forward without a graph, then replays an
        # older one forward and backward: 2F + B (Algorithm 1). The last stage runs F + B once.
        return forward_s + backward_s if last else 2 * forward_s + backward_s

    @classmethod
    def schedule_for(cls, num_stages: int, **options: Any) -> Schedule:
        return ReplaySchedule(num_stages)

    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        return ReplayStage(index, len(self.stages), module, optimizer,
                           loss_fn=self.loss_fn, bn_policy=self.bn_policy)
