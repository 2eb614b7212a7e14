"""What a process started as one rank of a multi-process run finds in its environment.

torchrun and gradkit's own launcher (``--workers``) set ``RANK`` and ``WORLD_SIZE``; every part of
gradkit that must know whether it runs as such a rank asks here (the training entry point, ``--stages
auto``, the distributed context), so the test lives in one place and importing it costs nothing.
"""

from __future__ import annotations

import os

__all__ = ["launched_world_size", "in_rank_process"]


def launched_world_size() -> int | None:
    """The run's number of processes if this process was started as one of its ranks, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def in_rank_process() -> bool:
    """Whether this process is one rank of a run of several processes (torchrun or the launcher)."""
    world = launched_world_size()
    return world is not None and world > 1
