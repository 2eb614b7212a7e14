"""Entry point of one worker process started by the launcher: ``python -m gradkit.distributed.rank SPEC``.

``SPEC`` is the launcher's JSON (:func:`gradkit.distributed.launch.launch_spec`): the run's
configuration, the launcher's ``sys.path`` and the modules that registered a method, model or dataset
outside gradkit, imported here before anything is built. Errors are printed as one line naming the
rank, like the CLI does; the exit code is the CLI's (2 bad input, 1 failure, 130 interrupted).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from gradkit.errors import GradkitError, print_line

LAUNCHER_PID_ENV = "GRADKIT_LAUNCHER_PID"
"""The launcher's process id, given to its workers: one whose parent is no longer it stops at once."""

__all__ = ["LAUNCHER_PID_ENV", "launcher_gone", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print_line("usage: python -m gradkit.distributed.rank SPEC.json (started by gradkit train --workers)")
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    _watch_launcher(rank, spec)
    logging.basicConfig(format="%(message)s", stream=sys.stderr,
                        level=logging.INFO if rank == 0 else logging.WARNING)
    sys.path.extend(p for p in spec.get("sys_path", []) if p not in sys.path)
    # After logging: importing torch takes a while.
    from gradkit.config import TrainConfig
    from gradkit.distributed.backend import train_rank

    try:
        for module in spec.get("plugins", []):
            importlib.import_module(module)
        train_rank(TrainConfig.from_dict(spec["config"]))
    except GradkitError as exc:
        if exc.exit_code == 130:
            if rank == 0:  # every rank stopped at the same step; one line is enough
                print_line(f"gradkit train: {exc}")
        else:
            print_line(f"gradkit train: error: {exc}")
        return exc.exit_code
    except BaseException:
        if _launcher_gone_within(2.0):  # the store or a peer vanished with the launcher: say that, not the trace
            _stop_orphan(rank, spec)
        raise
    return 0


def _launcher_pid() -> int | None:
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(launcher) if launcher.isdigit() else None  # None: started by torchrun, whose agent watches


def launcher_gone() -> bool:
    pid = _launcher_pid()
    return pid is not None and os.getppid() != pid  # an orphan is re-parented


def _launcher_gone_within(seconds: float) -> bool:
    """Whether the launcher is gone, or goes within ``seconds``. A killed launcher closes its sockets
    (the store's "Connection reset by peer" reaches this worker) a moment before the kernel re-parents
    its children, so right after such an error ``os.getppid()`` may still name it."""
    deadline = time.monotonic() + seconds
    while not launcher_gone():
        if _launcher_pid() is None or time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_orphan(rank: int, spec: dict[str, Any]) -> NoReturn:
    """Rank 0 prints one line and removes ``launch.json``; every rank removes the run's shared-memory
    rings; then the process ends at once (no trace of the collective it was waiting in)."""
    out = spec.get("config", {}).get("out")
    if rank == 0:
        kept = f"; the last good checkpoint in {out} is kept; continue with --resume" if out else ""
        print_line(f"gradkit train: error: the launcher (pid {_launcher_pid()}) is gone, so the workers stopped{kept}")
    try:
        from gradkit.distributed import shm
        from gradkit.distributed.context import RUN_ID_ENV
        from gradkit.run_folder import RunFolder

        if rank == 0 and out:
            RunFolder(out).remove_launch_spec()
        if os.environ.get(RUN_ID_ENV):
            shm.cleanup(os.environ[RUN_ID_ENV])
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    os._exit(1)


def _watch_launcher(rank: int, spec: dict[str, Any], interval_s: float = 0.2) -> None:
    """Stop this worker at once when its launcher is gone (killed with SIGKILL, say).

    Without it every worker printed a long DistNetworkError trace once the launcher's store vanished,
    and ``launch.json`` stayed behind. A daemon thread polls ``os.getppid()``, so this works while the
    main thread waits inside a collective.
    """
    if _launcher_pid() is None:
        return
    if launcher_gone():
        _stop_orphan(rank, spec)

    def watch() -> None:
        while not launcher_gone():
            time.sleep(interval_s)
        _stop_orphan(rank, spec)

    threading.Thread(target=watch, name="gradkit-launcher-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
