"""Fail fast, never hang: every rank watches the others through the shared store.

A background thread on each rank bumps a heartbeat counter in the store every
:data:`HEARTBEAT_S` seconds and checks three things: has a peer reported a failure, has a peer's
counter stopped moving for :data:`PEER_TIMEOUT_S` seconds (killed, frozen, or its machine lost), and
is the store itself still there. On any of them it prints one line naming the failed rank and ends the
process with ``os._exit`` — the main thread may be blocked in a receive that would never return, so
raising there is not enough. A worker that raises reports its own failure before exiting
(:meth:`Watchdog.fail`), so peers stop within one heartbeat instead of waiting for the timeout.

The checkpoint on disk is never touched here: the last one that completed stays the last good one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from gradkit.errors import print_line

__all__ = ["Watchdog", "HEARTBEAT_S", "PEER_TIMEOUT_S", "FAILED_EXIT_CODE"]

HEARTBEAT_S = float(os.environ.get("GRADKIT_HEARTBEAT_S", "1.0"))
"""Seconds between heartbeats (and checks)."""
PEER_TIMEOUT_S = float(os.environ.get("GRADKIT_PEER_TIMEOUT_S", "30"))
"""A peer whose heartbeat has not moved for this long is taken as lost."""
FAILED_EXIT_CODE = 1
"""Exit code of a rank that stops because a peer failed."""

_FAILED = "gradkit/failed"
_ALIVE = "gradkit/alive/{}"
_DONE = "gradkit/done/{}"


class Watchdog:
    """The heartbeat and failure watcher of one rank (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"gradkit-watchdog-{rank}", daemon=True)
        self._parent = os.getppid()
        self._watch_parent = os.environ.get("GRADKIT_AGENT_STORE") == "1"

    def start(self) -> None:
        self.store.add(_ALIVE.format(self.rank), 1)
        self._thread.start()

    def fail(self, message: str) -> None:
        """Tell every peer that this rank failed with ``message`` (first failure wins)."""
        self._stop.set()
        try:
            if not self.store.check([_FAILED]):
                self.store.set(_FAILED, json.dumps({"rank": self.rank, "message": message}))
        except Exception:  # the store may be gone already; peers then notice by the timeout
            pass

    def finish(self) -> None:
        """This rank ends normally: peers stop watching it."""
        self._stop.set()
        try:
            self.store.set(_DONE.format(self.rank), "1")
        except Exception:
            pass

    def failure(self) -> dict[str, Any] | None:
        """The failure some rank reported, if any."""
        if not self.store.check([_FAILED]):
            return None
        return json.loads(self.store.get(_FAILED).decode())

    # -- the thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        last_seen = {r: (-1, time.monotonic()) for r in peers}
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(_ALIVE.format(self.rank), 1)
                failure = self.failure()
                if failure is not None and failure["rank"] != self.rank:
                    self._exit(f"rank {failure['rank']} failed: {failure['message']}")
                now = time.monotonic()
                for r in peers:
                    if self.store.check([_DONE.format(r)]):
                        continue
                    beats = self.store.add(_ALIVE.format(r), 0)
                    if beats != last_seen[r][0]:
                        last_seen[r] = (beats, now)
                    elif now - last_seen[r][1] > PEER_TIMEOUT_S:
                        self._exit(f"rank {r} stopped answering (no heartbeat for {PEER_TIMEOUT_S:.0f} s)")
            except Exception as exc:  # the store went away: whoever hosted it is gone
                if self._stop.is_set() or _launcher_went_away():
                    return  # gradkit.distributed.rank's watcher says so, once, on rank 0
                self._exit(f"lost the rendezvous store ({type(exc).__name__}); the launcher or rank 0 is gone")
            if self._watch_parent and os.getppid() != self._parent:
                self._exit("the launcher process is gone")

    def _exit(self, reason: str) -> None:
        if self._stop.is_set():
            return
        print_line(f"gradkit train: error: rank {self.rank}: stopping: {reason}")
        os._exit(FAILED_EXIT_CODE)


def _launcher_went_away(wait_s: float = 1.0) -> bool:
    """Whether this worker's launcher died (its sockets close just before the worker is re-parented,
    so wait a moment for that)."""
    launcher = os.environ.get("GRADKIT_LAUNCHER_PID", "")  # gradkit.distributed.rank.LAUNCHER_PID_ENV

    def launcher_gone() -> bool:
        return launcher.isdigit() and os.getppid() != int(launcher)

    deadline = time.monotonic() + wait_s
    while True:
        if launcher_gone():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
