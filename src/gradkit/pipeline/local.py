"""The single-process executor: every stage's column of a schedule, interleaved in one process.

Messages travel through in-process channels, one FIFO per (kind, source, destination), exactly like
point-to-point links: a receive takes the oldest message of its channel and checks that it belongs to
the batch the action expects. Within a step the executor runs each stage's actions in order, moving
to the next stage when an action waits for a message that has not been sent yet, until every stage
has finished its column (data-flow order). A round in which no stage can move is a schedule bug and
raises :class:`~gradkit.pipeline.stage.PipelineError` instead of hanging.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gradkit.pipeline.schedule import ACTIVATION, DATA, LABEL, Action, Op, Schedule
from gradkit.pipeline.shared import SharedParameter
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["Executor", "LocalExecutor", "Message", "TimelineEntry", "execute_action"]


@dataclass(frozen=True)
class Message:
    """A tensor tagged with the batch it belongs to."""

    batch: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class TimelineEntry:
    """One executed action, as recorded with ``record_timeline=True``."""

    step: int
    stage: int
    op: Op
    batch: int


Channel = tuple[str, int, int]  # (kind, source, destination)


class Executor(Protocol):
    """What a :class:`~gradkit.methods.PipelineMethod` needs from an executor (local or distributed)."""

    def run_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 *, last_batch: int | None = None) -> None: ...

    def in_flight(self) -> dict[int, list[torch.Tensor]]: ...

    def state(self) -> list[tuple[str, int, int, list[tuple[int, torch.Tensor]]]]: ...

    def load_state(self, state: list[Any]) -> None: ...

    def empty(self) -> bool: ...

    def sum_shared(self, shared: Sequence[SharedParameter]) -> None: ...


def execute_action(stage: PipelineStage, action: Action,
                   received: dict[str, Message]) -> list[tuple[str, int, torch.Tensor]]:
    """Check that every received message is for ``action.batch``, run the action, and return its
    outgoing messages as (kind, destination, tensor); shared by every executor."""
    for (kind, source), message in zip(action.recv, received.values(), strict=True):
        if message.batch != action.batch:
            where = "the data source" if source == DATA else f"stage {source}"
            raise PipelineError(
                f"stage {stage.index} ({action.op}) expected the {kind} of batch {action.batch} from {where} "
                f"but received batch {message.batch}"
            )
    sent = stage.execute(action, {kind: m.tensor for kind, m in received.items()})
    outgoing = []
    for kind, destination in action.send:
        if kind not in sent:
            raise PipelineError(f"stage {stage.index} ({action.op} {action.batch}) did not produce its {kind}")
        outgoing.append((kind, destination, sent[kind]))
    return outgoing


class LocalExecutor:
    """Runs a :class:`Schedule` over a list of :class:`PipelineStage` in this process.

    Args:
        schedule: the order of actions.
        stages: one pipeline stage per stage index, in order.
        record_timeline: keep a list of every executed action (tests and ``--print-schedule``).
    """

    def __init__(self, schedule: Schedule, stages: Sequence[PipelineStage], *,
                 record_timeline: bool = False) -> None:
        if len(stages) != schedule.num_stages:
            raise ValueError(f"{len(stages)} pipeline stages for a {schedule.num_stages}-stage schedule")
        self.schedule = schedule
        self.stages = list(stages)
        self.channels: dict[Channel, deque[Message]] = {}
        self.record_timeline = record_timeline
        self.timeline: list[TimelineEntry] = []

    # -- running --------------------------------------------------------------------------------------
    def run_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 *, last_batch: int | None = None) -> None:
        """Execute iteration ``step`` of every stage; ``x, y`` is batch ``step`` (None when draining)."""
        k_stages = self.schedule.num_stages
        columns = [deque(self.schedule.actions(step, k, last_batch)) for k in range(k_stages)]
        for k, column in enumerate(columns):
            for action in column:
                for kind, source in action.recv:
                    if source != DATA:
                        continue
                    if x is None or y is None:
                        raise PipelineError(f"stage {k} needs data for batch {action.batch} at step {step}")
                    self._put((kind, DATA, k), Message(action.batch, x if kind == ACTIVATION else y))
        while any(columns):
            progressed = False
            for k, column in enumerate(columns):
                while column and self._ready(k, column[0]):
                    self._execute(step, k, column.popleft())
                    progressed = True
            if not progressed:
                waiting = "; ".join(
                    f"stage {k} waits for {column[0].recv} of batch {column[0].batch} ({column[0].op})"
                    for k, column in enumerate(columns) if column
                )
                raise PipelineError(f"step {step}: no stage can proceed: {waiting}")

    def _ready(self, stage: int, action: Action) -> bool:
        return all(self.channels.get((kind, source, stage)) for kind, source in action.recv)

    def _execute(self, step: int, stage: int, action: Action) -> None:
        received = {kind: self.channels[(kind, source, stage)].popleft() for kind, source in action.recv}
        sent = execute_action(self.stages[stage], action, received)
        for kind, destination, tensor in sent:
            self._put((kind, stage, destination), Message(action.batch, tensor))
        if self.record_timeline:
            self.timeline.append(TimelineEntry(step, stage, action.op, action.batch))

    def _put(self, channel: Channel, message: Message) -> None:
        self.channels.setdefault(channel, deque()).append(message)

    # -- buffers --------------------------------------------------------------------------------------
    def in_flight(self) -> dict[int, list[torch.Tensor]]:
        """Tensors waiting in channels, by receiving stage (data and labels excluded)."""
        held: dict[int, list[torch.Tensor]] = {}
        for (kind, source, destination), queue in self.channels.items():
            if source == DATA or kind == LABEL:
                continue
            held.setdefault(destination, []).extend(m.tensor for m in queue)
        return held

    def state(self) -> list[tuple[str, int, int, list[tuple[int, torch.Tensor]]]]:
        """Messages in flight, for checkpoints."""
        return [
            (kind, source, destination, [(m.batch, m.tensor) for m in queue])
            for (kind, source, destination), queue in self.channels.items() if queue
        ]

    def load_state(self, state: list[Any]) -> None:
        self.channels = {
            (kind, source, destination): deque(Message(batch, tensor) for batch, tensor in messages)
            for kind, source, destination, messages in state
        }

    def empty(self) -> bool:
        """No message is waiting anywhere."""
        return not any(self.channels.values())

    def sum_shared(self, shared: Sequence[SharedParameter]) -> None:
        """Nothing to do: in one process every use of a shared parameter added to the same ``.grad``."""
        return None
