"""``gradkit.train``: one run, in this process or with one process per stage.

The entry point chooses the backend of the one training loop (:class:`gradkit.loop.Trainer`):

* this process holds every stage (:class:`gradkit.backend.LocalBackend`);
* ``workers > 1``: :mod:`gradkit.distributed.launch` starts one process per stage on this machine
  and reads back what they wrote;
* this process is one rank of such a run (started by that launcher or by torchrun):
  :func:`gradkit.distributed.backend.train_rank`.

A single-process run imports nothing from :mod:`gradkit.distributed`.
"""

from __future__ import annotations

from gradkit.backend import LocalBackend
from gradkit.config import TrainConfig
from gradkit.data import Dataset
from gradkit.errors import ConfigError, DataError, GradkitError, RunInterrupted, WorkerFailed
from gradkit.launch_env import in_rank_process, launched_world_size
from gradkit.loop import RunResult, StepCallback, Trainer
from gradkit.run_folder import RunFolder
from gradkit.threads import torch_threads

__all__ = ["train"]


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    on_step: StepCallback | None = None,
) -> RunResult:
    """Train ``config.model`` on ``config.data`` with ``config.method``.

    Example:
        >>> result = gradkit.train(TrainConfig(method="bp", model="mlp", data="digits", epochs=5))
        >>> result.final["test_acc"]
        0.97

    Args:
        config: the run's configuration.
        dataset: an already loaded dataset to use instead of loading ``config.data``.
        on_step: called after every step with (epoch, step, loss).

    Returns:
        The per-epoch history, the first step's memory report, the trained method and model.

    Raises:
        ConfigError, DataError: bad options or data (nothing is trained).
        TrainingDiverged: the loss became NaN or infinite; the last good checkpoint is kept.
        RunInterrupted: Ctrl-C or SIGTERM; a checkpoint of the exact position was saved first.
    """
    if in_rank_process():
        world = launched_world_size()
        if config.workers is not None and config.workers != world:
            raise ConfigError(f"--workers {config.workers} but this process is one of {world} ranks; "
                              "leave --workers out under torchrun")
        if dataset is not None:
            raise ConfigError("a multi-process run loads its data on rank 0; pass data by name, not dataset=")
        # Imported here: only a multi-process run imports gradkit.distributed.
        from gradkit.distributed.backend import train_rank

        return train_rank(config, on_step=on_step)
    if config.workers is not None and config.workers > 1:
        if dataset is not None or on_step is not None:
            raise ConfigError("with workers > 1 the steps run in other processes; dataset= and on_step= "
                              "cannot be passed to them")
        return _launch(config)
    # One run at a time in a folder: this process owns it until the run ends (the OS drops the lock
    # if the process dies). Stale temporary files of interrupted writes are removed under the lock.
    folder = RunFolder(config.out) if config.out is not None else None
    lock = folder.lock(create=not config.resume) if folder is not None else None
    try:
        if folder is not None:
            folder.remove_stale_temp_files()
        # The run's --threads holds for the run only: the caller's thread count comes back afterwards.
        with torch_threads(config.threads):
            return _train_here(config, dataset, on_step)
    finally:
        if lock is not None:
            lock.release()


def _train_here(config: TrainConfig, dataset: Dataset | None, on_step: StepCallback | None) -> RunResult:
    backend = _local_backend(config, dataset)
    trainer = Trainer(backend)
    try:
        return trainer.run(on_step)
    except KeyboardInterrupt:
        # A KeyboardInterrupt raised inside a step (a later signal, or a callback) leaves that step
        # half done, so it is not saved: the last checkpoint on disk stays.
        p, folder = backend.progress, backend.folder
        kept = (f"the last checkpoint in {folder} is kept; continue with --resume"
                if folder is not None and folder.holds_single_process_run() else "no checkpoint had been written yet")
        raise RunInterrupted(f"interrupted at epoch {p.epoch + 1} step {p.step_in_epoch}; {kept}") from None


def _local_backend(config: TrainConfig, dataset: Dataset | None) -> LocalBackend:
    """The single-process backend; a checkpoint whose keys or shapes do not fit is a one-line error."""
    if not config.resume:
        return LocalBackend(config, dataset)
    try:
        return LocalBackend(config, dataset)
    except GradkitError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        # A forged or foreign checkpoint.pt that torch could read: missing keys, tensors of other shapes.
        path = RunFolder(config.out).checkpoint_path if config.out is not None else "the checkpoint"
        raise DataError(f"{path} does not fit this run ({_reason(exc)}); it is not a checkpoint of this "
                        "model and method: resume the run folder that wrote it, or start a new run with "
                        "another --out") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing entry {exc}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if ln.startswith(("Missing", "Unexpected", "size mismatch"))]
    line = (detail or lines or [type(exc).__name__])[0].rstrip(":.")
    return line if len(line) <= 160 else line[:157] + "..."


def _launch(config: TrainConfig) -> RunResult:
    """Train in ``config.workers`` processes (one stage each) and read back what they wrote."""
    from gradkit.distributed.launch import launch

    code = launch(config, config.workers or 1)
    # The workers printed what happened (one line each): the CLI does not repeat it.
    error: GradkitError | None = None
    if code == RunInterrupted.exit_code:
        error = RunInterrupted(f"interrupted; the checkpoint in {config.out} is kept; continue with --resume")
    elif code != 0:
        error = WorkerFailed(f"a worker failed (exit code {code}); the last good checkpoint in {config.out} is kept")
        error.exit_code = code
    if error is not None:
        error.already_reported = True  # type: ignore[attr-defined]
        raise error
    assert config.out is not None
    folder = RunFolder(config.out)
    saved = folder.read_config() or {}
    return RunResult(config, folder.read_metrics(), None, list(saved["stage_sizes"]), None, None)
