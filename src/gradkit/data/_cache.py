"""A cache of decoded images, so that a JPEG/PNG dataset is decoded once, not on every run.

Decoding CIFAR-10's 60,000 JPEGs takes seconds to a minute; loading the decoded uint8 arrays from an
uncompressed ``.npz`` takes well under a second. Entries are keyed by the source (path, size,
modification time, and for folders every file's), so a changed source is decoded again. The cache is
an optimisation only: when it cannot be read or written we log a warning and carry on.

Location: ``$GRADKIT_CACHE`` or else ``~/.cache/gradkit/decoded``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gradkit._fileio import atomic_write

__all__ = ["cache_dir", "fingerprint", "load_cached", "save_cached"]

log = logging.getLogger(__name__)

# Bump when the cached layout changes, so old entries are ignored.
_FORMAT = "gradkit-decoded-v1"


def cache_dir() -> Path:
    """The decoded-image cache folder (not created here)."""
    env = os.environ.get("GRADKIT_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "gradkit" / "decoded"
    except RuntimeError:  # no home directory: fall back to the temporary folder
        return Path(tempfile.gettempdir()) / "gradkit-decoded"


def fingerprint(source: Path, files: Iterable[tuple[str, int, int]] = ()) -> str:
    """A hex key for ``source``: its resolved path, size and mtime, plus ``(name, size, mtime_ns)`` rows.

    Args:
        source: the archive or folder the images come from.
        files: for a folder, one row per image file, so that editing any image invalidates the entry.
    """
    digest = hashlib.sha256(_FORMAT.encode())
    stat = source.stat()
    digest.update(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    for name, size, mtime in files:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _entry(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{key[:24]}.npz"


def load_cached(name: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored for ``(name, key)``, or ``None`` when there is no usable entry."""
    path = _entry(name, key)
    if not path.is_file():
        return None
    try:
        # allow_pickle=False: a cache file is data, never code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("ignoring unreadable cache file %s (%s); decoding again", path, exc)
        return None
    log.info("loaded decoded %s images from cache %s", name, path)
    return arrays


def save_cached(name: str, key: str, arrays: dict[str, np.ndarray]) -> Path | None:
    """Store ``arrays`` for ``(name, key)`` atomically; returns the file, or ``None`` if it failed.

    The file is written under a temporary name in the same folder, flushed to disk, then renamed, so a
    crash or a concurrent run never leaves a half-written entry under the real name.
    """
    path = _entry(name, key)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except OSError as exc:
        log.warning(
            "cannot write the decoded-image cache %s (%s); the next run decodes again", path, exc
        )
        return None
    log.info("cached decoded %s images in %s", name, path)
    return path
