"""Crash-safe file writes: a file is either the old complete one or the new complete one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gradkit.errors import StorageError

__all__ = ["atomic_write", "check_writable_folder", "fsync_dir", "is_disk_full", "storage_error"]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: ``ENOSPC``/``EDQUOT``, or torch.save's zip writer failing
    with ``[enforce fail at inline_container.cc] unexpected pos`` (how it reports a short write)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "inline_container" in text and "unexpected pos" in text


def storage_error(exc: BaseException, path: Path) -> StorageError | None:
    """A one-line :class:`StorageError` for an ``OSError`` writing ``path``, or None for other errors."""
    kept = f"the last good {path.name} is kept" if path.exists() else f"nothing was written to {path.name}"
    if is_disk_full(exc):
        return StorageError(f"no space left on device writing {path}; free space or choose another --out; {kept}")
    if isinstance(exc, OSError) and not isinstance(exc, StorageError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return StorageError(f"cannot write {path}: {reason}; check the folder or choose another --out; {kept}")
    return None


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary file and move it to ``path`` only once it is complete.

    Raises:
        StorageError: the folder cannot be written or the disk is full; the previous file is kept.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp creates 0600; results and caches should be readable like any other file.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        error = storage_error(exc, path) if isinstance(exc, (OSError, RuntimeError)) else None
        if error is not None:
            raise error from exc
        raise
    fsync_dir(path.parent)
    return path


def check_writable_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create ``path`` (with its parents) and prove it writable by creating and removing a probe file.

    Permission bits are not enough: root bypasses them, while a read-only mount or an immutable folder
    refuses root too. Called before any data is loaded, so a bad ``--out`` costs nothing.

    Raises:
        StorageError: ``path`` is a file, lies under a file, is read-only, or the disk is full.
    """
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"is under {parent}, which is a file"
            raise StorageError(f"{option} {path} {where}; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gradkit-probe.", dir=path)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageError(f"no space left on device in {option} {path}; free space or choose another "
                               f"{option}") from None
        reason = exc.strerror or type(exc).__name__
        raise StorageError(f"{option} {path} is not writable ({reason}); choose another {option}") from None
    return path


def fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
