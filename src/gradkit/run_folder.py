"""The run folder (``--out``): every file name in it, and every read and write of it.

Layout::

    config.json                      the configuration (written when the run starts)
    metrics.jsonl                    one JSON object per finished epoch
    model.pt                         the final model weights (``model.state_dict()``), when the run completes
    checkpoint.pt                    single process: the last state, replaced atomically
    checkpoint.pt.sha256             its SHA-256, written (atomically) after it
    checkpoint.prev.pt (+ .sha256)   single process: the previous verified checkpoint, kept as a fallback
    checkpoint.json                  one process per stage: the manifest naming the last step folder and
                                     every shard's SHA-256
    checkpoint.prev.json             one process per stage: the previous verified manifest (a fallback)
    checkpoint/step-N/rankR.pt       one process per stage: each rank's shard of that checkpoint
    launch.json                      while ``--workers`` runs: the configuration the worker processes read
    .lock                            locked (``flock``) by the process that owns the folder while it runs

Single-process runs write ``checkpoint.pt``; multi-process runs write sharded checkpoints: every rank
saves its shard (atomically) into a new step folder, and only when all shards are on disk does rank 0
replace the manifest (atomically); then every rank deletes its older step folders. A crash at any
moment leaves the folder pointing at a complete checkpoint. On several machines each rank reads and
writes only its own shard in its own ``--out``; only rank 0 needs the manifest.

Nothing is lost:

* **One run at a time.** :meth:`RunFolder.lock` takes an OS lock (``flock``) on ``.lock`` for the
  run's life, in the process that owns the folder: the single process, the ``--workers`` launcher
  (its workers write under its lock), or rank 0 under torchrun. A second run exits with one line
  naming the holder's pid. The OS drops the lock when the process dies, however it dies.
* **Digests.** Every checkpoint file is written with its SHA-256 (a ``.sha256`` sidecar, or the
  manifest's ``shard_sha256`` for shards) and read back and verified before the previous checkpoint
  is given up: the previous verified checkpoint (``checkpoint.prev.pt``, or ``checkpoint.prev.json`` and
  its step folder) is kept until then. A checkpoint whose bytes do not match is never loaded:
  ``--resume`` falls back to the previous one and says so, or stops with one line when there is none.
* **No orphans.** Temporary files of interrupted atomic writes (``.NAME.XXXXXXXX.tmp``, see
  :mod:`gradkit._fileio`) of this folder's own files are removed when a run starts or resumes in it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gradkit.checkpoint import atomic_write, load_checkpoint, write_json_atomic
from gradkit.errors import ConfigError, DataError

__all__ = ["RunFolder", "CONFIG", "METRICS", "MODEL", "CHECKPOINT", "MANIFEST", "LAUNCH_SPEC", "LOCK"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
MANIFEST = "checkpoint.json"
SHARDS = "checkpoint"
LAUNCH_SPEC = "launch.json"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
PREVIOUS_MANIFEST = "checkpoint.prev.json"
DIGEST_SUFFIX = ".sha256"
LOCK = ".lock"
_OWN_FILES = frozenset({CONFIG, METRICS, MODEL, CHECKPOINT, MANIFEST, LAUNCH_SPEC, PREVIOUS_CHECKPOINT,
                        PREVIOUS_MANIFEST, CHECKPOINT + DIGEST_SUFFIX, PREVIOUS_CHECKPOINT + DIGEST_SUFFIX})
# gradkit._fileio.atomic_write's temporary names: mkstemp(prefix=f".{name}.", suffix=".tmp").
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_SHARD = re.compile(r"^rank\d+\.pt$")
_FORMAT = 1
"""Version of the checkpoint layout; a checkpoint of another version is refused, not misread."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_verified(path: Path, state: dict[str, Any]) -> str:
    """Save ``state`` atomically and return its SHA-256, after reading the file back to check it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    expected = hashlib.sha256(data).hexdigest()
    atomic_write(path, lambda f: f.write(data))
    if _sha256(path) != expected:
        raise DataError(f"{path} does not read back as written (disk error?); the previous checkpoint is kept")
    return expected


def _replace_by_link(source: Path, target: Path) -> None:
    """Make ``target`` the same bytes as ``source`` atomically (a hard link where possible, else a copy)."""
    tmp = target.with_name(f".{target.name}.linktemp.tmp")  # the pattern stale-file removal knows
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class _Lock:
    """An ``flock`` on a run folder's ``.lock``, held until :meth:`release` or the process's end."""

    def __init__(self, fd: int | None, folder: Path | None = None, *, created: bool = False) -> None:
        self._fd = fd
        self._folder = folder
        self._created = created
        """Whether this lock made the folder (removed again if the run wrote nothing into it)."""

    def release(self) -> None:
        if self._fd is None:
            return
        if self._folder is not None and [p.name for p in self._folder.iterdir()] == [LOCK]:
            # A run refused or interrupted before it wrote anything leaves nothing of its own behind
            # (and no empty folder, when the lock made it).
            (self._folder / LOCK).unlink(missing_ok=True)
            if self._created:
                with contextlib.suppress(OSError):
                    self._folder.rmdir()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        """Words for an error message: which checkpoint survives (verified against its digest), if any."""
        good = self.verified_checkpoint(multi_process=multi_process)
        if good is None:
            if self.has_checkpoint(multi_process=multi_process):
                return f"no checkpoint in {self.path} matches its digest"
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {good} (verified) is kept"

    def verified_checkpoint(self, *, multi_process: bool) -> Path | None:
        """The newest checkpoint here whose bytes match their recorded digest (None: there is none)."""
        if multi_process:
            for manifest_path in (self.manifest_path, self.path / PREVIOUS_MANIFEST):
                manifest = self._try_manifest(manifest_path)
                if manifest is not None and not self._damaged_shards(manifest):
                    return manifest_path
            return None
        for path in (self.checkpoint_path, self.path / PREVIOUS_CHECKPOINT):
            if path.is_file() and self._digest_matches(path) is not False:
                return path
        return None

    # -- one run at a time ------------------------------------------------------------------------------
    def lock(self, *, create: bool = True) -> _Lock:
        """Lock this folder for this process's run (released by ``release()``, ``with``, or exit).

        Args:
            create: make the folder first (False: a missing folder is not locked and nothing is created).

        Raises:
            ConfigError: another process holds the lock (its pid is named).
        """
        created = False
        if create and not self.path.exists():
            self.prepare()
            created = True
        elif not self.path.is_dir():
            return _Lock(None)
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {path}: {exc.strerror}; choose another --out") from None
            raise ConfigError(f"{self.path} is in use by another gradkit run (pid {holder}); "
                              "wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return _Lock(fd, self.path, created=created)

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove the temporary files interrupted writes left (only gradkit's own); call with the lock held."""
        removed = []
        folders = [self.path, *sorted((self.path / SHARDS).glob("step-*"))]
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _TEMP_FILE.match(entry.name)
                if match is None or not entry.is_file():
                    continue
                name = match["name"]
                if name in _OWN_FILES if folder == self.path else _SHARD.match(name):
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
        if removed:
            log.info("removed %d unfinished temporary file(s) in %s", len(removed), self.path)
        return removed

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
    @staticmethod
    def _digest_path(path: Path) -> Path:
        return path.with_name(path.name + DIGEST_SUFFIX)

    def _digest_matches(self, path: Path) -> bool | None:
        """Whether ``path`` matches its ``.sha256`` sidecar; None when it has none (an older gradkit)."""
        sidecar = self._digest_path(path)
        if not sidecar.is_file():
            return None
        try:
            return sidecar.read_text().split()[0] == _sha256(path)
        except (OSError, IndexError):
            return False

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write ``checkpoint.pt`` and its digest; the previous verified one stays as ``checkpoint.prev.pt``.

        Order (a crash at any point leaves at least one checkpoint that matches its digest): the
        current checkpoint, if verified, becomes the previous one (a hard link, then its digest); the
        new checkpoint is written and read back; then its digest.
        """
        current, previous = self.checkpoint_path, self.path / PREVIOUS_CHECKPOINT
        if current.is_file() and self._digest_matches(current):
            _replace_by_link(current, previous)
            write_digest = self._digest_path(current).read_text()
            atomic_write(self._digest_path(previous), lambda f: f.write(write_digest.encode()))
        digest = _write_verified(current, {"format": _FORMAT, **state})
        atomic_write(self._digest_path(current), lambda f: f.write(f"{digest}  {current.name}\n".encode()))
        return current

    def load_checkpoint(self) -> dict[str, Any]:
        """The newest single-process checkpoint that matches its digest.

        A damaged ``checkpoint.pt`` is reported (a warning naming it) and the previous verified
        checkpoint is loaded instead.

        Raises:
            DataError: none here (a multi-process run is named as such), damaged with no previous good
                one, unreadable, or another format.
        """
        if not self.checkpoint_path.is_file() and self.holds_multi_process_run():
            raise DataError(f"{self.path} holds a multi-process run; resume it with --workers (or torchrun)")
        current, previous = self.checkpoint_path, self.path / PREVIOUS_CHECKPOINT
        path = current
        if current.is_file() and self._digest_matches(current) is False:
            if not (previous.is_file() and self._digest_matches(previous)):
                raise DataError(f"{current} is damaged (its SHA-256 does not match {self._digest_path(current).name}) "
                                "and there is no previous good checkpoint; start the run again with another --out")
            log.warning("%s is damaged (its SHA-256 does not match %s); resuming from the previous checkpoint %s",
                        current, self._digest_path(current).name, previous)
            path = previous
        saved = load_checkpoint(path)
        if saved.get("format") != _FORMAT:
            raise DataError(f"{path} was written by an incompatible gradkit version")
        return saved

    # -- sharded checkpoints of multi-process runs -------------------------------------------------------
    def _step_folder(self, global_step: int) -> Path:
        return self.path / SHARDS / f"step-{global_step:08d}"

    def shard_path(self, global_step: int, rank: int) -> Path:
        """Where ``rank`` saves its shard of the checkpoint taken after ``global_step`` steps."""
        return self._step_folder(global_step) / f"rank{rank}.pt"

    def save_shard(self, global_step: int, rank: int, state: dict[str, Any]) -> str:
        """Save and read back this rank's shard; returns its SHA-256 (the manifest records it)."""
        path = self.shard_path(global_step, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_verified(path, {"format": _FORMAT, "rank": rank, "global_step": global_step, **state})

    def commit_manifest(self, global_step: int, manifest: dict[str, Any],
                        previous: dict[str, Any] | None = None) -> None:
        """Rank 0, after every shard was saved: point the manifest at this step.

        ``previous`` (the last verified manifest, if any) is written first as ``checkpoint.prev.json``;
        ``manifest`` should hold ``shard_sha256`` (``{"rank0.pt": hex, ...}``).
        """
        if previous is not None:
            write_json_atomic(self.path / PREVIOUS_MANIFEST, previous)
        write_json_atomic(self.manifest_path, self.manifest_record(global_step, manifest))

    def manifest_record(self, global_step: int, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest exactly as :meth:`commit_manifest` writes it."""
        return {"format": _FORMAT, "step_folder": self._step_folder(global_step).name, **manifest}

    def prune_shards(self, global_step: int, keep_step: int | None = None) -> None:
        """Every rank, after the manifest names ``global_step``: drop older step folders here, except
        ``keep_step`` (the previous verified checkpoint's, kept as a fallback)."""
        keep = {self._step_folder(global_step)}
        if keep_step is not None:
            keep.add(self._step_folder(keep_step))
        for folder in (self.path / SHARDS).glob("step-*"):
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _try_manifest(self, path: Path) -> dict[str, Any] | None:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return dict(manifest) if isinstance(manifest, dict) and manifest.get("format") == _FORMAT else None

    def _damaged_shards(self, manifest: dict[str, Any]) -> list[Path]:
        """Shards the manifest names that are here but do not match its digests (or are missing,
        when ``all_local``: every rank wrote into this folder)."""
        folder = self.path / SHARDS / str(manifest.get("step_folder"))
        damaged = []
        for name, digest in (manifest.get("shard_sha256") or {}).items():
            path = folder / name
            if not path.is_file():
                if manifest.get("all_local", True):
                    damaged.append(path)
                continue
            if _sha256(path) != digest:
                damaged.append(path)
        return damaged

    def read_manifest(self, *, report: bool = True) -> dict[str, Any]:
        """The manifest of the newest multi-process checkpoint whose shards here match their digests.

        When a shard of the current checkpoint is damaged, the previous verified checkpoint
        (``checkpoint.prev.json``) is returned and a warning names the damaged file.

        Raises:
            DataError: no manifest (a single-process run is named as such), unreadable, another format,
                or a damaged shard and no previous good checkpoint.
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
        damaged = self._damaged_shards(manifest)
        if damaged:
            previous = self._try_manifest(self.path / PREVIOUS_MANIFEST)
            what = f"{damaged[0]} is damaged or missing (its SHA-256 does not match {MANIFEST})"
            if previous is None or self._damaged_shards(previous):
                raise DataError(f"{what} and there is no previous good checkpoint; "
                                "start the run again with another --out")
            if report:
                log.warning("%s; resuming from the previous checkpoint %s (%s)", what,
                            self.path / PREVIOUS_MANIFEST, previous["step_folder"])
            manifest = previous
        return dict(manifest)

    def load_shard(self, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
        """This rank's shard of the checkpoint the manifest names, checked against its digest."""
        path = self.path / SHARDS / manifest["step_folder"] / f"rank{rank}.pt"
        digest = (manifest.get("shard_sha256") or {}).get(path.name)
        if digest is not None and path.is_file() and _sha256(path) != digest:
            raise DataError(f"{path} is damaged (its SHA-256 does not match {MANIFEST}); "
                            "it cannot be resumed on this machine")
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
