"""Joining a multi-process run: rank, process groups, the rendezvous store and the watchdog.

A process is a worker of a multi-process run when ``RANK`` and ``WORLD_SIZE`` are set, either by
``torchrun`` or by gradkit's own launcher (``gradkit train --workers K``, :mod:`gradkit.distributed.launch`).
With the launcher the rendezvous store lives in the launcher process (``GRADKIT_AGENT_STORE=1``), so it
outlives any worker; under torchrun ``env://`` finds the store torchrun set up.
"""

from __future__ import annotations

import ctypes
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gradkit.distributed import shm
from gradkit.distributed.executor import MESSAGE_KINDS
from gradkit.distributed.shm import SharedMemoryLinks
from gradkit.distributed.watchdog import Watchdog
from gradkit.errors import ConfigError

__all__ = ["DistContext", "join"]

AGENT_STORE_ENV = "GRADKIT_AGENT_STORE"
"""Set to ``1`` by the launcher: connect to its store as a client instead of ``env://``."""
RUN_ID_ENV = "GRADKIT_RUN_ID"
"""Set by the launcher: the run's name in shared-memory file names (so it can clean them up)."""
_STORE_PREFIX = "gradkit/pg"
_RUN_ID = "gradkit/run_id"


@dataclass
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: this process's rank, which is also its stage.
        world_size: number of ranks (= stages).
        local_world_size: ranks on this machine (threads default to cores / this).
        device: the device this rank computes on.
        store: the key-value store every rank shares (stop requests, failures, heartbeats).
        groups: one process group per message kind, for the pipeline's point-to-point messages.
        control: a process group for collectives (evaluation, checkpoints), apart from the messages.
    """

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    store: Any
    groups: dict[str, Any]
    control: Any
    watchdog: Watchdog = field(repr=False)
    local_peers: frozenset[int] = frozenset()
    """Other ranks on this machine (messages to them go through shared memory)."""
    run_id: str = ""
    """A name for this run shared by all ranks (shared-memory file names)."""

    def shared_memory(self) -> SharedMemoryLinks | None:
        """This rank's shared-memory mailboxes, when the platform has them and a peer is local."""
        if not self.local_peers or self.device.type != "cpu" or not shm.available():
            return None
        return SharedMemoryLinks(self.run_id, self.rank)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def close(self) -> None:
        """Leave the run cleanly: tell the watchdogs, then tear down the process groups."""
        self.watchdog.finish()
        if dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
        if device.index is None:  # one GPU per rank on each machine
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"rank {local_rank} on this machine has no GPU of its own ({torch.cuda.device_count()} "
                    "visible); use at most one worker per GPU, or --device cpu"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed heap memory instead of returning it to the system (Linux only).

    Every step allocates and frees the same multi-MiB activations. By default glibc maps each one
    fresh and unmaps it on free, so every step page-faults it in again; with two stage processes on
    two cores these faults cost FR's stages 10-15% of their speed. Keeping the memory (an mmap
    threshold of 32 MiB, the largest glibc allows, and no trimming below 1 GiB) removes them.
    Returns whether the settings were applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    return bool(ok and libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024))


def join(device_name: str = "auto", *, timeout_s: float = 600.0) -> DistContext:
    """Join the run this process was started for (see :func:`gradkit.launch_env.launched_world_size`).

    Args:
        device_name: ``cpu``, ``cuda`` (one GPU per local rank), ``cuda:N`` or ``auto``.
        timeout_s: how long collectives may wait for a peer before failing (the watchdog usually
            notices a lost peer much sooner).
    """
    keep_freed_memory()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = _device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store: Any
    if os.environ.get(AGENT_STORE_ENV) == "1":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None,
                              is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(_STORE_PREFIX, store), rank=rank,
                                world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
        store = dist.distributed_c10d._get_default_store()
    ranks = list(range(world_size))
    groups = {kind: dist.new_group(ranks) for kind in MESSAGE_KINDS}
    # Collectives of Python objects (weights for evaluation, tallies) go through gloo even on GPUs.
    control = dist.new_group(ranks, backend="gloo")
    watchdog = Watchdog(store, rank, world_size)
    watchdog.start()
    # Peers on this machine exchange payloads through shared memory (gradkit.distributed.shm).
    hosts: list[Any] = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=control)
    local_peers = frozenset(r for r, h in enumerate(hosts) if h == hosts[rank] and r != rank)
    if rank == 0:
        store.set(_RUN_ID, os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex[:12])
    run_id = store.get(_RUN_ID).decode()
    return DistContext(rank, world_size, local_world_size, device, store, groups, control, watchdog,
                       local_peers=local_peers, run_id=run_id)
