"""The run folder (``--out``): every file name in it, and every read and write of it.

Layout::

    config.json                      the configuration (written when the run starts)
    metrics.jsonl                    one JSON object per finished epoch
    model.pt                         the final model weights (``model.state_dict()``), when the run completes
    checkpoint.pt                    single process: the last good state, replaced atomically
    checkpoint.json                  one process per stage: the manifest naming the last good step folder
    checkpoint/step-N/rankR.pt       one process per stage: each rank's shard of that checkpoint
    launch.json                      while ``--workers`` runs: the configuration the worker processes read

Single-process runs write ``checkpoint.pt``; multi-process runs write sharded checkpoints: every rank
saves its shard (atomically) into a new step folder, and only when all shards are on disk does rank 0
replace the manifest (atomically); then every rank deletes its older step folders. A crash at any
moment leaves the folder pointing at a complete checkpoint. On several machines each rank reads and
writes only its own shard in its own ``--out``; only rank 0 needs the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gradkit.checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json_atomic
from gradkit.errors import ConfigError, DataError

__all__ = ["RunFolder", "CONFIG", "METRICS", "MODEL", "CHECKPOINT", "MANIFEST", "LAUNCH_SPEC"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
MANIFEST = "checkpoint.json"
SHARDS = "checkpoint"
LAUNCH_SPEC = "launch.json"
_FORMAT = 1
"""Version of the checkpoint layout; a checkpoint of another version is refused, not misread."""


class RunFolder:
    """One run folder; see the module docstring for its layout.

    Example:
        >>> folder = RunFolder("runs/fr2")
        >>> folder.holds_run()
        False
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- what is there -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def launch_spec_path(self) -> Path:
        return self.path / LAUNCH_SPEC

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def holds_single_process_run(self) -> bool:
        return self.checkpoint_path.is_file()

    def holds_multi_process_run(self) -> bool:
        return self.manifest_path.is_file()

    def holds_run(self) -> bool:
        """Whether a gradkit run (of any kind) has checkpointed here."""
        return self.holds_single_process_run() or self.holds_multi_process_run()

    def check_new_run(self) -> None:
        """Refuse to start a new run where one already is.

        Raises:
            ConfigError: the folder holds a run (single or multi-process).
        """
        if self.holds_run():
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")

    def has_checkpoint(self, *, multi_process: bool) -> bool:
        return self.holds_multi_process_run() if multi_process else self.holds_single_process_run()

    def describe_kept_checkpoint(self, *, multi_process: bool) -> str:
        """Words for an error message: which checkpoint survives, if any."""
        if not self.has_checkpoint(multi_process=multi_process):
            return "no checkpoint had been written yet"
        if multi_process:
            return f"the last good checkpoint in {self.path} is kept"
        return f"the last good checkpoint {self.checkpoint_path} is kept"

    # -- configuration and metrics -------------------------------------------------------------------
    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict[str, Any] | None:
        """The run's ``config.json``, or None when there is none."""
        if not self.config_path.is_file():
            return None
        try:
            return dict(json.loads(self.config_path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"cannot read {self.config_path}: {exc}") from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by ``history`` (the checkpoint is the truth on resume)."""
        data = "".join(json.dumps(r) + "\n" for r in history).encode()
        atomic_write(self.metrics_path, lambda f: f.write(data))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every epoch record in ``metrics.jsonl``.

        Raises:
            DataError: no metrics file, or a line that is not JSON.
        """
        if not self.metrics_path.is_file():
            raise DataError(
                f"{self.path} is not a gradkit run folder (no {METRICS}); pass a folder given to --out"
            )
        history = []
        for n, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.metrics_path} line {n} is not valid JSON ({exc.msg})") from None
        return history

    def write_model(self, state_dict: dict[str, Any]) -> None:
        atomic_write(self.model_path, lambda f: torch.save(state_dict, f))

    # -- single-process checkpoint ---------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.checkpoint_path, {"format": _FORMAT, **state})

    def load_checkpoint(self) -> dict[str, Any]:
        """The single-process checkpoint.

        Raises:
            DataError: none here (a multi-process run is named as such), unreadable, or another format.
        """
        if not self.checkpoint_path.is_file() and self.holds_multi_process_run():
            raise DataError(f"{self.path} holds a multi-process run; resume it with --workers (or torchrun)")
        saved = load_checkpoint(self.checkpoint_path)
        if saved.get("format") != _FORMAT:
            raise DataError(f"{self.checkpoint_path} was written by an incompatible gradkit version")
        return saved

    # -- sharded checkpoints of multi-process runs -------------------------------------------------------
    def _step_folder(self, global_step: int) -> Path:
        return self.path / SHARDS / f"step-{global_step:08d}"

    def shard_path(self, global_step: int, rank: int) -> Path:
        """Where ``rank`` saves its shard of the checkpoint taken after ``global_step`` steps."""
        return self._step_folder(global_step) / f"rank{rank}.pt"

    def save_shard(self, global_step: int, rank: int, state: dict[str, Any]) -> Path:
        path = self.shard_path(global_step, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(path, {"format": _FORMAT, "rank": rank, "global_step": global_step, **state})

    def commit_manifest(self, global_step: int, manifest: dict[str, Any]) -> None:
        """Rank 0, after every shard was saved: point the manifest at this step."""
        write_json_atomic(self.manifest_path, {"format": _FORMAT,
                                               "step_folder": self._step_folder(global_step).name, **manifest})

    def prune_shards(self, global_step: int) -> None:
        """Every rank, after the manifest names ``global_step``: drop older step folders here."""
        keep = self._step_folder(global_step)
        for folder in (self.path / SHARDS).glob("step-*"):
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest of the last good multi-process checkpoint.

        Raises:
            DataError: no manifest (a single-process run is named as such), unreadable, or another format.
        """
        path = self.manifest_path
        if not path.is_file():
            if self.holds_single_process_run():
                raise DataError(f"{self.path} holds a single-process run; resume it without --workers")
            raise DataError(f"no multi-process checkpoint in {self.path} (no {MANIFEST}); "
                            "start a new run without --resume")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc
        if manifest.get("format") != _FORMAT:
            raise DataError(f"{path} was written by an incompatible gradkit version")
        return dict(manifest)

    def load_shard(self, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
        """This rank's shard of the checkpoint the manifest names."""
        path = self.path / SHARDS / manifest["step_folder"] / f"rank{rank}.pt"
        shard = load_checkpoint(path)
        if shard.get("rank") != rank or shard.get("global_step") != manifest["global_step"]:
            raise DataError(f"{path} does not belong to rank {rank} at step {manifest['global_step']}")
        return shard

    # -- the launcher's spec ------------------------------------------------------------------------------
    def write_launch_spec(self, spec: dict[str, Any]) -> Path:
        self.launch_spec_path.write_text(json.dumps(spec, indent=2))
        return self.launch_spec_path

    def remove_launch_spec(self) -> None:
        self.launch_spec_path.unlink(missing_ok=True)
