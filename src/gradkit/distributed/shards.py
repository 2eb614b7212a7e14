"""Sharded checkpoints of a multi-process run: one file per rank, committed by a manifest.

Layout inside the run folder::

    checkpoint.json                 the manifest: which step folder is the last good checkpoint
    checkpoint/step-00001234/rank0.pt, rank1.pt, ...

Every rank writes its shard (atomically) into a new step folder; only when all shards are on disk does
rank 0 replace ``checkpoint.json`` (atomically); then every rank deletes its older step folders. A crash at any moment
therefore leaves the manifest pointing at a complete set of shards. On several machines, each rank
reads its own shard from its own ``--out``; only rank 0 needs the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gradkit.checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from gradkit.errors import DataError

__all__ = ["MANIFEST", "commit", "has_checkpoint", "load_shard", "prune", "read_manifest", "save_shard", "shard_path"]

MANIFEST = "checkpoint.json"
_FOLDER = "checkpoint"
_FORMAT = 1


def _step_folder(out: Path, global_step: int) -> Path:
    return out / _FOLDER / f"step-{global_step:08d}"


def shard_path(out: Path, global_step: int, rank: int) -> Path:
    """Where ``rank`` saves its shard of the checkpoint taken after ``global_step`` steps."""
    return _step_folder(out, global_step) / f"rank{rank}.pt"


def has_checkpoint(out: Path) -> bool:
    return (out / MANIFEST).is_file()


def save_shard(out: Path, global_step: int, rank: int, state: dict[str, Any]) -> Path:
    path = shard_path(out, global_step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, {"format": _FORMAT, "rank": rank, "global_step": global_step, **state})


def commit(out: Path, global_step: int, manifest: dict[str, Any]) -> None:
    """Rank 0, after every shard was saved: point the manifest at this step, drop older steps."""
    write_json_atomic(out / MANIFEST, {"format": _FORMAT, "step_folder": _step_folder(out, global_step).name,
                                       **manifest})


def prune(out: Path, global_step: int) -> None:
    """Every rank, after the manifest names ``global_step``: drop older step folders in its ``out``
    (on several machines without a shared filesystem each keeps its own shards)."""
    keep = _step_folder(out, global_step)
    for folder in (out / _FOLDER).glob("step-*"):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the last good checkpoint in ``out``.

    Raises:
        DataError: no checkpoint, or an unreadable manifest.
    """
    path = out / MANIFEST
    if not path.is_file():
        if (out / "checkpoint.pt").is_file():
            raise DataError(f"{out} holds a single-process run; resume it without --workers")
        raise DataError(f"no multi-process checkpoint in {out} (no {MANIFEST}); start a new run without --resume")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format") != _FORMAT:
        raise DataError(f"{path} was written by an incompatible gradkit version")
    return manifest


def load_shard(out: Path, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's shard of the checkpoint the manifest names."""
    path = out / _FOLDER / manifest["step_folder"] / f"rank{rank}.pt"
    shard = load_checkpoint(path)
    if shard.get("rank") != rank or shard.get("global_step") != manifest["global_step"]:
        raise DataError(f"{path} does not belong to rank {rank} at step {manifest['global_step']}")
    return shard
