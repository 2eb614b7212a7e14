"""Checkpoints that survive crashes: atomic writes, safe loads.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so at any moment the folder holds either the previous complete checkpoint or the new complete
one. Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain data but
never runs code.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from gradkit._fileio import atomic_write
from gradkit.errors import DataError

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Save ``state`` (tensors and plain data only) atomically with ``torch.save``."""
    return atomic_write(path, lambda f: torch.save(state, f))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln]
    return (keep or [type(exc).__name__])[0].split(". ")[0].rstrip(".")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint without executing code from it.

    Raises:
        DataError: the file is missing, truncated, or holds something other than tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}; start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises retrying with weights_only=False, which would run whatever code the
        # file holds: never repeat that advice.
        raise DataError(f"{path} is not a gradkit checkpoint or is unsafe to load (it holds objects "
                        "other than tensors and plain data); do not load it, use a checkpoint gradkit "
                        "wrote") from None
    except Exception as exc:  # torch raises several types for corrupt files
        raise DataError(f"cannot read checkpoint {path}: {_first_line(exc)}; the file is truncated or "
                        "not a gradkit checkpoint") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} does not hold a gradkit state (got {type(state).__name__})")
    return state
