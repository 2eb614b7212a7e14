"""Exceptions that carry a message meant for the user.

Every error a user can cause by bad input (a wrong name, a missing or corrupt file, sizes that do not
add up) is a :class:`GradkitError`. The CLI prints its message on one line and exits with code 2; library
users can catch it as one type. Messages name the bad value and say what would work.
"""

from __future__ import annotations

import sys

__all__ = [
    "GradkitError",
    "DataError",
    "ConfigError",
    "StorageError",
    "TrainingDiverged",
    "RunInterrupted",
    "WorkerFailed",
    "PeerFailed",
    "PipelineError",
    "KernelError",
    "print_line",
]


class GradkitError(Exception):
    """Base class for errors caused by user input; the message is one line that says how to fix it."""

    exit_code: int = 2


class ConfigError(GradkitError, ValueError):
    """An option, name or size that cannot work (also a ``ValueError``)."""


class DataError(GradkitError):
    """A dataset that is missing, truncated, corrupt or unsafe to open."""


class StorageError(GradkitError, OSError):
    """A file or folder that cannot be written: not a folder, read-only, or the disk is full (also an
    ``OSError``)."""


class TrainingDiverged(GradkitError):
    """The loss became NaN or infinite; the last good checkpoint is kept.

    Attributes:
        where: the position, e.g. ``"epoch 2 step 7"`` (empty when unknown).
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class RunInterrupted(GradkitError):
    """Training stopped on Ctrl-C or SIGTERM; a checkpoint of the exact position was saved."""

    exit_code = 130


class WorkerFailed(GradkitError):
    """A worker process of a multi-process run failed; its own message was printed by it."""

    exit_code = 1


class PeerFailed(GradkitError):
    """Another rank of a multi-process run failed, so this one stopped."""

    exit_code = 1


class PipelineError(RuntimeError):
    """A message arrived for the wrong batch, or a schedule cannot make progress: a bug in a pipelined
    method or an executor, not bad input (so not a :class:`GradkitError`)."""


class KernelError(ValueError):
    """A native compression kernel was asked to work on sizes or buffers it cannot handle safely (the
    checks before every C call; a bug or an unsupported tensor, not bad input)."""


def print_line(text: str) -> None:
    """Write ``text`` and its newline to stderr in one write, then flush.

    ``print`` writes the text and the newline separately (two system calls on a non-terminal stderr),
    so the one-line errors of worker processes sharing the launcher's stderr could run together on one
    line. A single write of a short line to a pipe is atomic.
    """
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
