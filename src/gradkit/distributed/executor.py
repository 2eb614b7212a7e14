"""The multi-process executor: one stage's column of a schedule, messages over torch.distributed.

Each process runs :meth:`Schedule.actions` for its own stage only, exactly as the single-process
:class:`~gradkit.pipeline.local.LocalExecutor` runs it for every stage. Activations go up and δ comes
down as point-to-point messages; rank 0 is also the data source, so it sends the labels (and nothing
else: images never leave rank 0) to the stages whose actions consume them.

A message is a small int64 header (batch id, dtype, shape) followed by the payload. Every message kind
travels in its own process group, so the two per-pair FIFOs of a kind (header, payload) can never be
confused with another kind's, on gloo (CPU) as on NCCL (GPU), which ignores tags. Sends are
asynchronous (``isend``): a stage keeps computing while its output travels. Receives are lazy: a
message is received when an action needs it, so a stage that runs ahead (FR's stage 0 plays the next
batch before the δ of the previous one arrives) is not held back.

A parameter that several stages use (a tied embedding) has a copy on each rank that holds it; after
every step those ranks all-reduce its gradient in a process group of their own (:meth:`sum_shared`),
so each copy takes the same update (:mod:`gradkit.pipeline.shared`).

Consistent checkpoints need every message that was sent before the checkpoint to be in a receiver's
local channel, not on the wire. The executor counts, from the schedule, how many messages each peer
has sent to it so far (``expected``); :meth:`drain` receives until the counts match, after which
:meth:`state` is exactly what the single-process executor would hold for this stage.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradkit.distributed.shm import SharedMemoryLinks
from gradkit.pipeline.local import Message, execute_action
from gradkit.pipeline.schedule import ACTIVATION, DATA, LABEL, Action, Schedule
from gradkit.pipeline.shared import SharedParameter
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["DistributedExecutor", "MESSAGE_KINDS", "shared_parameter_groups"]

MESSAGE_KINDS = (ACTIVATION, "delta", LABEL)
"""Every kind of message a schedule sends; each gets its own process group."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.bool)
_MAX_DIMS = 9
_HEADER = 3 + _MAX_DIMS + 3  # batch, dtype code, ndim, dimensions, then shared-memory generation/slot/sequence
_INLINE = -1  # slot value of a payload that follows through the process group

IncomingChannel = tuple[str, int]  # (kind, source stage or DATA)


def shared_parameter_groups(shared: Sequence[SharedParameter]) -> dict[tuple[int, ...], Any]:
    """One process group per set of ranks that hold a shared parameter (every rank must call this,
    with the same ``shared``, in the same order: creating a group is a collective)."""
    groups: dict[tuple[int, ...], Any] = {}
    for s in shared:
        if s.stages not in groups:
            groups[s.stages] = dist.new_group(list(s.stages))
    return groups


def _header(batch: int, tensor: torch.Tensor, shared: tuple[int, int, int] | None) -> torch.Tensor:
    if tensor.dtype not in _DTYPES:
        raise PipelineError(f"cannot send a tensor of dtype {tensor.dtype}; supported: {_DTYPES}")
    if tensor.dim() > _MAX_DIMS:
        raise PipelineError(f"cannot send a {tensor.dim()}-dimensional tensor (at most {_MAX_DIMS})")
    shape = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
    generation, slot, sequence = shared if shared is not None else (0, _INLINE, 0)
    values = [batch, _DTYPES.index(tensor.dtype), tensor.dim(), *shape, generation, slot, sequence]
    return torch.tensor(values, dtype=torch.int64)


class DistributedExecutor:
    """Runs stage ``rank``'s column of ``schedule`` with ``stage``; peers run theirs elsewhere.

    Args:
        schedule: the same schedule object every rank uses.
        stage: this rank's pipeline stage.
        groups: one process group per message kind (:data:`MESSAGE_KINDS`), all ranks in each.
        device: where received tensors are placed (the stage's device).
        shared_memory: mailboxes for peers on this machine (:mod:`gradkit.distributed.shm`), and
            the ranks they reach; payloads to other ranks go through the process group.
        shared_groups: from :func:`shared_parameter_groups`, when stages share parameters.
    """

    def __init__(self, schedule: Schedule, stage: PipelineStage, groups: dict[str, Any],
                 device: torch.device, *, shared_memory: SharedMemoryLinks | None = None,
                 local_peers: frozenset[int] = frozenset(),
                 shared_groups: dict[tuple[int, ...], Any] | None = None) -> None:
        self.shared_memory = shared_memory if device.type == "cpu" else None
        self.local_peers = local_peers
        self.schedule = schedule
        self.stage = stage
        self.rank = stage.index
        self.groups = groups
        self.device = device
        # Headers travel on the CPU with gloo and on the device with NCCL.
        self._header_device = device if device.type == "cuda" else torch.device("cpu")
        self.channels: dict[IncomingChannel, deque[Message]] = {}
        self.expected: Counter[IncomingChannel] = Counter()
        """Messages peers have sent (or will send) to this stage since the counters were reset."""
        self.received: Counter[IncomingChannel] = Counter()
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self.shared_groups = shared_groups or {}

    # -- running --------------------------------------------------------------------------------------
    def run_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 *, last_batch: int | None = None) -> None:
        """Execute this stage's actions of iteration ``step``; rank 0 passes batch ``step`` as ``x, y``."""
        schedule, rank = self.schedule, self.rank
        for source in range(schedule.num_stages):
            if source == rank:
                continue
            for action in schedule.actions(step, source, last_batch):
                for kind, destination in action.send:
                    if destination == rank:
                        self.expected[(kind, source)] += 1
        own = schedule.actions(step, rank, last_batch)
        if rank != 0:
            for action in own:
                for kind, source in action.recv:
                    if source == DATA:
                        self.expected[(kind, DATA)] += 1
        else:
            self._serve_data(step, x, y, last_batch)
        for action in own:
            self._execute(action)
        self._reap()

    def _serve_data(self, step: int, x: torch.Tensor | None, y: torch.Tensor | None,
                    last_batch: int | None) -> None:
        """Rank 0: hand batch ``step`` to every stage that consumes it (labels only, to other ranks)."""
        for stage in range(self.schedule.num_stages):
            for action in self.schedule.actions(step, stage, last_batch):
                for kind, source in action.recv:
                    if source != DATA:
                        continue
                    if x is None or y is None:
                        raise PipelineError(f"stage {stage} needs data for batch {action.batch} at step {step}")
                    tensor = x if kind == ACTIVATION else y
                    if stage == 0:
                        self.channels.setdefault((kind, DATA), deque()).append(Message(action.batch, tensor))
                    else:
                        self._send(kind, stage, action.batch, tensor)

    def _execute(self, action: Action) -> None:
        received = {kind: self._take(kind, source) for kind, source in action.recv}
        for kind, destination, tensor in execute_action(self.stage, action, received):
            self._send(kind, destination, action.batch, tensor)

    def sum_shared(self, shared: Sequence[SharedParameter]) -> None:
        """Sum each shared parameter's gradient over the ranks that hold it (all-reduce in their group).

        A rank whose use produced no gradient this step adds zeros; a count of the ranks that did
        travels with it, so a parameter no use touched keeps ``.grad = None`` everywhere (the
        optimizer then skips it on every rank alike).
        """
        for s in shared:
            if self.rank not in s.stages:
                continue
            if s.stages not in self.shared_groups:
                raise PipelineError(f"stage {self.rank} has no process group for the parameter shared by "
                                    f"stages {s.stages}")
            p = s.param
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            count = torch.ones(1, dtype=grad.dtype, device=grad.device) * (p.grad is not None)
            flat = torch.cat([grad.reshape(-1), count])
            dist.all_reduce(flat, group=self.shared_groups[s.stages])
            p.grad = flat[:-1].view_as(p) if flat[-1].item() > 0 else None

    # -- messages -------------------------------------------------------------------------------------
    @staticmethod
    def _peer(source: int) -> int:
        return 0 if source == DATA else source

    def _send(self, kind: str, destination: int, batch: int, tensor: torch.Tensor) -> None:
        payload = tensor.detach().contiguous()
        group = self.groups[kind]
        shared = None
        if self.shared_memory is not None and destination in self.local_peers:
            shared = self.shared_memory.write(kind, destination, payload)
        header = _header(batch, payload, shared).to(self._header_device)
        # Buffers must stay alive until the sends complete: keep them with their handles.
        self._pending.append((dist.isend(header, destination, group=group), header))
        if shared is None:
            self._pending.append((dist.isend(payload, destination, group=group), payload))

    def _take(self, kind: str, source: int) -> Message:
        channel = (kind, source)
        queue = self.channels.get(channel)
        if queue:
            return queue.popleft()
        if source == self.rank or (source == DATA and self.rank == 0):
            raise PipelineError(f"stage {self.rank} needs a {kind} from itself that was never produced")
        return self._receive(channel)

    def _receive(self, channel: IncomingChannel) -> Message:
        kind, source = channel
        if self.received[channel] >= self.expected[channel]:
            raise PipelineError(
                f"stage {self.rank} waits for a {kind} from {'the data source' if source == DATA else f'stage {source}'} "
                "that the schedule never sends"
            )
        group, peer = self.groups[kind], self._peer(source)
        header = torch.empty(_HEADER, dtype=torch.int64, device=self._header_device)
        dist.recv(header, peer, group=group)
        values = header.tolist()
        batch, dtype, ndim = values[0], _DTYPES[values[1]], values[2]
        shape = values[3 : 3 + ndim]
        generation, slot, sequence = values[3 + _MAX_DIMS :]
        if slot != _INLINE:
            if self.shared_memory is None:
                raise PipelineError(f"stage {self.rank} got a shared-memory message but has no mailboxes")
            payload = self.shared_memory.read(kind, peer, generation, slot, sequence, dtype, shape)
        else:
            payload = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(payload, peer, group=group)
        self.received[channel] += 1
        return Message(batch, payload)

    def drain(self) -> None:
        """Receive every message already sent to this stage into its local channels (before a checkpoint)."""
        for channel in sorted(self.expected):
            while self.received[channel] < self.expected[channel]:
                self.channels.setdefault(channel, deque()).append(self._receive(channel))
        self.wait_sends()

    def wait_sends(self) -> None:
        """Block until every message this stage sent has been delivered."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending.clear()

    def _reap(self) -> None:
        self._pending = [(h, t) for h, t in self._pending if not h.is_completed()]

    # -- buffers --------------------------------------------------------------------------------------
    def in_flight(self) -> dict[int, list[torch.Tensor]]:
        """Tensors waiting in this stage's channels (data and labels excluded)."""
        tensors = [m.tensor for (kind, source), q in self.channels.items()
                   if source != DATA and kind != LABEL for m in q]
        return {self.rank: tensors}

    def state(self) -> list[tuple[str, int, int, list[tuple[int, torch.Tensor]]]]:
        """This stage's incoming messages, in :class:`LocalExecutor` form; call :meth:`drain` first."""
        if any(self.received[c] < self.expected[c] for c in self.expected):
            raise PipelineError(f"stage {self.rank}: messages still on the wire; drain() before saving")
        return [
            (kind, source, self.rank, [(m.batch, m.tensor.cpu()) for m in queue])
            for (kind, source), queue in self.channels.items() if queue
        ]

    def load_state(self, state: list[Any]) -> None:
        self.channels = {
            (kind, source): deque(Message(batch, tensor.to(self.device)) for batch, tensor in messages)
            for kind, source, destination, messages in state if destination == self.rank
        }
        self.expected.clear()
        self.received.clear()

    def empty(self) -> bool:
        """No message is waiting here and none is on its way."""
        return not any(self.channels.values()) and all(
            self.received[c] >= self.expected[c] for c in self.expected)
