"""Unpickling that refuses to run code: for the official CIFAR "python version" batches.

A pickle can name any importable callable and have it called on load (``os.system`` included), so a
downloaded or shared ``data_batch_1`` is untrusted input. :class:`SafeUnpickler` resolves only the few
globals that rebuilding plain numpy arrays needs and refuses everything else, *before* anything is
called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gradkit.errors import DataError

__all__ = ["SafeUnpickler", "safe_loads"]


def _numpy_core(submodule: str, name: str) -> Any:
    # numpy 2 renamed numpy.core to numpy._core; old pickles (CIFAR's are from 2009) name the former.
    import importlib

    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"this numpy has no {submodule}.{name}")  # pragma: no cover


def _allowed() -> dict[tuple[str, str], Any]:
    import _codecs

    reconstruct = _numpy_core("multiarray", "_reconstruct")
    frombuffer = _numpy_core("numeric", "_frombuffer")
    return {
        # ndarray.__reduce__ (protocols 0-4): _reconstruct(ndarray, shape, dtype) then __setstate__.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        # ndarray.__reduce_ex__ (protocol 5): _frombuffer(buffer, dtype, shape, order).
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes for protocol 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _codecs.encode,
    }


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds plain data: numpy arrays, lists, dicts, strings, numbers.

    Args:
        file: binary stream to read from.
        source: the file name used in error messages.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # CIFAR pickles come from Python 2: "bytes" keeps py2 str (keys, array buffers) as bytes.
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            # os.system pickles as posix.system (nt.system on Windows); say what the author wrote.
            shown = "os" if module in ("posix", "nt") else module
            raise DataError(
                f"refusing to load {self._source}: it asks to import {shown}.{name}; only plain data "
                "(arrays, lists, dicts, strings, numbers) is allowed"
            ) from None


def safe_loads(data: bytes, source: str | Path) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`.

    Args:
        data: the pickle bytes.
        source: file (or archive member) name for error messages.

    Raises:
        DataError: the pickle asks for anything but plain data, or is truncated or corrupt.
    """
    try:
        return SafeUnpickler(io.BytesIO(data), str(source)).load()
    except DataError:
        raise
    except Exception as exc:  # any failure inside a corrupt pickle is a data problem
        raise DataError(
            f"{source} is truncated or corrupt: cannot unpickle it ({type(exc).__name__}: {exc})"
        ) from exc
