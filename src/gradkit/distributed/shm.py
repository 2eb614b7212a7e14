"""Shared-memory mailboxes for stages on the same machine: the payload skips the TCP loopback.

Through gloo, an 8 MiB activation crosses the loopback at about 1 GB/s, and the kernel copies cost CPU
time that the two stages need for compute (on 2 cores FR's first stage lost a third of its speed to
it). Between processes on one machine the payload is instead copied into a slot of a ring buffer in
``/dev/shm`` (0.6 ms for 8 MiB) and only the small header travels through gloo, which also orders
the messages. This is the reference implementation's idea (shared-memory mailboxes), without its busy
waiting for data or its fixed shapes: a message larger than the ring's slots starts a new, larger
ring ("generation").

Each (kind, sender, receiver) link has its own ring file of :data:`SLOTS` slots plus a counter of
consumed messages that the receiver bumps after copying one out; the sender only waits when all slots
are still unread, which the schedules never cause (at most K messages of a link are in flight).
The receiver unlinks a ring file as soon as it has mapped it, so nothing is left in ``/dev/shm``
even if a process is killed later; the launcher also removes the run's files when it exits.

Ordering note: the receiver's copy must finish before its counter store is seen by the sender; x86
keeps stores after loads in order (TSO), which is where this transport is enabled (see
:func:`available`).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["SLOTS", "SharedMemoryLinks", "available", "cleanup"]

SLOTS = 8
"""Slots per ring: more than any schedule keeps in flight on one link."""
_ROOT = Path("/dev/shm")
_CONTROL = 64  # bytes before the first slot: the consumed counter (int64), cache-line padded
_ALIGN = 64


def available() -> bool:
    """Whether shared-memory mailboxes can be used here (Linux /dev/shm on x86-64, not disabled)."""
    return (os.environ.get("GRADKIT_SHM", "1") != "0" and _ROOT.is_dir()
            and platform.machine().lower() in ("x86_64", "amd64"))


def _path(run_id: str, kind: str, source: int, destination: int, generation: int) -> Path:
    return _ROOT / f"gradkit-{run_id}-{kind}-{source}-{destination}-g{generation}"


def cleanup(run_id: str) -> None:
    """Remove every ring file of run ``run_id`` (the launcher calls this when the run ends)."""
    for path in _ROOT.glob(f"gradkit-{run_id}-*"):
        path.unlink(missing_ok=True)


def _room_for(nbytes: int) -> bool:
    """Whether a ring of ``nbytes`` fits in half of what ``/dev/shm`` has free (tmpfs pages are only
    taken when written, and a write past the space would kill the process with SIGBUS)."""
    stat = os.statvfs(_ROOT)
    return nbytes <= stat.f_bavail * stat.f_frsize // 2


class _Ring:
    def __init__(self, path: Path, capacity: int, *, create: bool) -> None:
        self.capacity = capacity
        self.path = path
        size = _CONTROL + SLOTS * capacity
        if create:
            path.unlink(missing_ok=True)
        self.buffer = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        self.consumed = self.buffer[:8].view(torch.int64)
        self.sent = 0

    def slot(self, index: int, nbytes: int) -> torch.Tensor:
        start = _CONTROL + index * self.capacity
        return self.buffer[start : start + nbytes]


class SharedMemoryLinks:
    """The rings of one rank: those it writes (one per outgoing link) and those it reads.

    Args:
        run_id: a name shared by every rank of the run (file names).
        rank: this rank.
    """

    def __init__(self, run_id: str, rank: int) -> None:
        self.run_id = run_id
        self.rank = rank
        self._out: dict[tuple[str, int], tuple[int, _Ring]] = {}
        self._in: dict[tuple[str, int, int], _Ring] = {}

    def write(self, kind: str, destination: int, payload: torch.Tensor) -> tuple[int, int, int] | None:
        """Copy ``payload`` (contiguous, CPU) into a free slot; returns (generation, slot, sequence).

        None when ``/dev/shm`` has no room for a ring this size (containers often give it 64 MiB):
        the caller then sends the payload through the process group instead.
        """
        nbytes = payload.numel() * payload.element_size()
        generation, ring = self._out.get((kind, destination), (-1, None))  # type: ignore[assignment]
        if ring is None or nbytes > ring.capacity:
            capacity = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
            if not _room_for(_CONTROL + SLOTS * capacity):
                return None
            generation += 1
            ring = _Ring(_path(self.run_id, kind, self.rank, destination, generation), capacity, create=True)
            self._out[(kind, destination)] = (generation, ring)
        sequence = ring.sent
        while sequence - int(ring.consumed[0]) >= SLOTS:  # every slot unread: wait for the receiver
            time.sleep(0.0002)
        ring.slot(sequence % SLOTS, nbytes).copy_(payload.reshape(-1).view(torch.uint8))
        ring.sent += 1
        return generation, sequence % SLOTS, sequence

    def read(self, kind: str, source: int, generation: int, slot: int, sequence: int,
             dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """Copy the message out of its slot and free the slot for the sender."""
        key = (kind, source, generation)
        ring = self._in.get(key)
        if ring is None:
            path = _path(self.run_id, kind, source, self.rank, generation)
            capacity = (path.stat().st_size - _CONTROL) // SLOTS
            ring = _Ring(path, capacity, create=False)
            path.unlink(missing_ok=True)  # both sides have it mapped: the name is no longer needed
            # An older generation of this link is finished once a newer one is in use.
            for old in [k for k in self._in if k[:2] == key[:2] and k[2] < generation]:
                del self._in[old]
            self._in[key] = ring
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        tensor = ring.slot(slot, nbytes).clone().view(dtype).view(shape)
        ring.consumed.fill_(sequence + 1)
        return tensor

    def close(self) -> None:
        for _, ring in self._out.values():
            ring.path.unlink(missing_ok=True)
        self._out.clear()
        self._in.clear()
