"""Pipeline schedules as data: which stage does what, on which batch, at which step.

A schedule answers one question, ``actions(step, stage)``: the ordered list of :class:`Action` that
stage ``stage`` executes during iteration ``step``. Every action names the mini-batch it works on and
the messages it consumes and produces, so an executor needs nothing else to run it: the single-process
executor (:mod:`gradkit.pipeline.local`) interleaves the stages in one process, and a multi-process
executor runs each stage's column in its own process. Nothing here knows how messages travel.

Batches are numbered from 0 in the order they enter the pipeline. ``last_batch`` tells a schedule that
no batch after it exists, which is how the pipeline drains (:meth:`Schedule.drain_steps` more steps).

Each pipelined method defines its own schedule next to its stage (``gradkit.methods.features_replay``,
``delayed_gradients``, ``synthetic_gradients``, ``synchronous``); this module holds what they share:
the typed actions (:class:`Op`), the message kinds and the :class:`Schedule` base with its helpers.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = [
    "ACTIVATION",
    "DATA",
    "DELTA",
    "LABEL",
    "Action",
    "Op",
    "Schedule",
]

ACTIVATION = "activation"
"""Message kind: a stage's output, sent up to the next stage."""
DELTA = "delta"
"""Message kind: the gradient of the loss with respect to a stage's input, sent down."""
LABEL = "label"
"""Message kind: the targets of a batch, sent from the data source."""
DATA = -1
"""Peer index of the data source (inputs and labels)."""


class Op(str, enum.Enum):
    """What a stage can do in one action; each pipelined method's stage handles the ops it schedules."""

    PLAY = "play"
    """Forward without a graph, keeping the input for a later replay (Features Replay)."""
    REPLAY = "replay"
    """Forward a kept input again with autograd and backpropagate the δ received (Features Replay)."""
    FORWARD = "forward"
    """Forward with autograd, keeping the graph for a later backward."""
    BACKWARD = "backward"
    """Backpropagate the δ received through a kept graph."""
    SYNTHETIC = "synthetic"
    """Backpropagate a synthesizer's prediction of δ (DNI)."""
    FIT = "fit"
    """Regress the synthesizer onto the true δ (DNI)."""
    UPDATE = "update"
    """The stage's optimizer step."""
    LOSS = "loss"
    """The last stage: forward with autograd, loss, backward."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Action:
    """One thing a stage does in one step.

    Attributes:
        op: what to do (:class:`Op`).
        batch: the batch the action works on; every message it consumes or sends carries this id.
        recv: messages consumed, as (kind, source stage or :data:`DATA`).
        send: messages produced, as (kind, destination stage).
    """

    op: Op
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
        return [Action(Op.LOSS, step, recv, self._down(stage)), Action(Op.UPDATE, step)]

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
