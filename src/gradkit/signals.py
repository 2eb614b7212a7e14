"""Stop requests: Ctrl-C (SIGINT) and SIGTERM become a flag the training loop checks between steps.

One handler serves every way gradkit trains. The first signal sets the flag; the loop then stops at a
step boundary and saves a checkpoint of the exact position. A second signal within
:data:`REPEAT_S` seconds is the same request arriving twice (a terminal's Ctrl-C reaches every process
of a torchrun job, and torchrun forwards it once more) and is ignored; a later one aborts at once
with ``KeyboardInterrupt``, keeping the last checkpoint already on disk.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["REPEAT_S", "stop_requests"]

REPEAT_S = 3.0
"""Seconds within which a second signal counts as the first one arriving again."""


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """Within the block, SIGINT and SIGTERM set the yielded event (see the module docstring).

    Outside the main thread no handler can be installed; the event then never fires.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    first: list[float] = []

    def handler(signum: int, frame: object) -> None:
        if not first:
            first.append(time.monotonic())
            stop.set()
        elif time.monotonic() - first[0] > REPEAT_S:
            raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
