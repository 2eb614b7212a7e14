"""Pipeline schedules as data: which stage does what, on which batch, at which step.

A schedule answers one question, ``actions(step, stage)``: the ordered list of :class:`Action` that
stage ``stage`` executes during iteration ``step``. Every action names the mini-batch it works on and
the messages it consumes and produces, so an executor needs nothing else to run it: the single-process
executor (:mod:`gradkit.pipeline.local`) interleaves the stages in one process, and a multi-process
executor runs each stage's column in its own process. Nothing here knows how messages travel.

Batches are numbered from 0 in the order they enter the pipeline. ``last_batch`` tells a schedule that
no batch after it exists, which is how the pipeline drains (:meth:`Schedule.drain_steps` more steps).

The schedules (K stages, stage k = 0..K-1, step t):

* Features Replay (Huo et al., NeurIPS 2018, Algorithm 1): stage k < K-1 *plays* batch t without a
  graph, then *replays* batch t-(K-1-k) with its current weights and the stale error gradient δ that
  stage k+1 sent in the previous step, then updates. The last stage runs batch t with autograd.
* DDG (Huo et al., ICML 2018): the same timing, but a *forward* keeps its graph and the *backward*
  happens K-1-k steps later, with no recomputation.
* DNI (Jaderberg et al., 2017): every stage updates at once with a synthetic δ and fits its
  synthesizer on the true δ of the previous batch when it arrives; during a warm-up, or when true and
  synthetic gradients are mixed, a stage waits for the true δ of the same batch (backward locking).
* Synchronous pipeline: forward through all stages, backward through all, update — plain backprop
  split into stages (the backward-locked reference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = [
    "ACTIVATION",
    "DATA",
    "DELTA",
    "LABEL",
    "SCHEDULES",
    "Action",
    "Schedule",
    "ReplaySchedule",
    "DelayedGradientSchedule",
    "SyntheticGradientSchedule",
    "SynchronousSchedule",
]

ACTIVATION = "activation"
"""Message kind: a stage's output, sent up to the next stage."""
DELTA = "delta"
"""Message kind: the gradient of the loss with respect to a stage's input, sent down."""
LABEL = "label"
"""Message kind: the targets of a batch, sent from the data source."""
DATA = -1
"""Peer index of the data source (inputs and labels)."""


@dataclass(frozen=True)
class Action:
    """One thing a stage does in one step.

    Attributes:
        op: what to do, e.g. ``"play"``, ``"replay"``, ``"update"`` (each worker knows its own ops).
        batch: the batch the action works on; every message it consumes or sends carries this id.
        recv: messages consumed, as (kind, source stage or :data:`DATA`).
        send: messages produced, as (kind, destination stage).
    """

    op: str
    batch: int
    recv: tuple[tuple[str, int], ...] = ()
    send: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return f"{self.op} {self.batch}"


class Schedule(ABC):
    """The order of actions of a K-stage pipeline; see the module docstring."""

    name: str = ""

    def __init__(self, num_stages: int) -> None:
        if num_stages < 1:
            raise ValueError(f"a pipeline needs at least one stage, got {num_stages}")
        self.num_stages = num_stages

    @abstractmethod
    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        """The actions of ``stage`` in iteration ``step``; none touch a batch after ``last_batch``."""

    @abstractmethod
    def drain_steps(self) -> int:
        """Steps without new data that finish every batch already in the pipeline."""

    def first_update(self, stage: int) -> int:
        """The first step at which ``stage`` updates its weights (its warm-up length)."""
        return 0

    # -- helpers shared by the schedules ------------------------------------------------------------
    def _last(self, stage: int) -> bool:
        return stage == self.num_stages - 1

    def _from_below(self, stage: int) -> tuple[str, int]:
        return (ACTIVATION, stage - 1 if stage > 0 else DATA)

    def _up(self, stage: int) -> tuple[tuple[str, int], ...]:
        return () if self._last(stage) else ((ACTIVATION, stage + 1),)

    def _down(self, stage: int) -> tuple[tuple[str, int], ...]:
        return ((DELTA, stage - 1),) if stage > 0 else ()

    @staticmethod
    def _exists(batch: int, last_batch: int | None) -> bool:
        return batch >= 0 and (last_batch is None or batch <= last_batch)

    def _loss_actions(self, step: int, stage: int, last_batch: int | None) -> list[Action]:
        """The last stage: forward with autograd, loss, backward, update, δ down."""
        if not self._exists(step, last_batch):
            return []
        recv = (self._from_below(stage), (LABEL, DATA))
        return [Action("loss", step, recv, self._down(stage)), Action("update", step)]

    # -- display -----------------------------------------------------------------------------------
    def grid(self, steps: int, *, last_batch: int | None = None) -> str:
        """The schedule as a table, steps down and stages across (``print(schedule.grid(6))``)."""
        header = ["step"] + [f"stage {k}" for k in range(self.num_stages)]
        rows = [header]
        for t in range(steps):
            cells = [", ".join(str(a) for a in self.actions(t, k, last_batch)) or "-"
                     for k in range(self.num_stages)]
            rows.append([str(t)] + cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


class ReplaySchedule(Schedule):
    """Features Replay: play batch t, replay batch t-(K-1-k) against the stale δ (Algorithm 1).

    Stage k neither replays nor updates during its first K-1-k steps (the reference's warm-up; the
    paper's "zero features" would let weight decay and momentum move the weights).
    """

    name = "fr"
    forward_op, backward_op = "play", "replay"

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
            out.append(Action("update", old))
        return out

    def drain_steps(self) -> int:
        return self.num_stages - 1


class DelayedGradientSchedule(ReplaySchedule):
    """DDG: FR's timing, but the forward keeps its graph and the backward runs K-1-k steps later."""

    name = "ddg"
    forward_op, backward_op = "forward", "backward"


class SyntheticGradientSchedule(Schedule):
    """DNI: update at once with a synthetic δ; fit the synthesizer when the true δ arrives.

    Args:
        num_stages: K.
        locked_steps: steps (from the start) during which every stage waits for the true δ of the
            same batch (the warm-up that trains synthesizers while using true gradients).
        always_locked: wait for the true δ at every step (needed to mix true and synthetic δ).
    """

    name = "dni"

    def __init__(self, num_stages: int, *, locked_steps: int = 0, always_locked: bool = False) -> None:
        super().__init__(num_stages)
        if locked_steps < 0:
            raise ValueError(f"locked_steps must be >= 0, got {locked_steps}")
        self.locked_steps = locked_steps
        self.always_locked = always_locked

    def locked(self, step: int) -> bool:
        """Whether stages wait for the true δ of batch ``step``."""
        return self.always_locked or step < self.locked_steps

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if self._last(stage):
            return self._loss_actions(step, stage, last_batch)
        out = []
        if self._exists(step, last_batch):
            labels = ((LABEL, DATA),)
            out.append(Action("forward", step, (self._from_below(stage),) + labels, self._up(stage)))
            if self.locked(step):
                out.append(Action("backward", step, ((DELTA, stage + 1),), self._down(stage)))
                out.append(Action("update", step))
                out.append(Action("fit", step))
            else:
                out.append(Action("synthetic", step, (), self._down(stage)))
                out.append(Action("update", step))
        previous = step - 1
        if self._exists(previous, last_batch) and not self.locked(previous):
            out.append(Action("fit", previous, ((DELTA, stage + 1),)))
        return out

    def drain_steps(self) -> int:
        return 1


class SynchronousSchedule(Schedule):
    """Backprop split into stages: forward up, backward down, then every stage updates."""

    name = "bp"

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if self._last(stage):
            return self._loss_actions(step, stage, last_batch)
        if not self._exists(step, last_batch):
            return []
        return [
            Action("forward", step, (self._from_below(stage),), self._up(stage)),
            Action("backward", step, ((DELTA, stage + 1),), self._down(stage)),
            Action("update", step),
        ]

    def drain_steps(self) -> int:
        return 0


SCHEDULES: dict[str, type[Schedule]] = {
    "fr": ReplaySchedule,
    "ddg": DelayedGradientSchedule,
    "dni": SyntheticGradientSchedule,
    "bp": SynchronousSchedule,
}
"""The schedule of each pipelined method (``bp``: the synchronous, backward-locked pipeline)."""
