"""``gradkit train --workers K``: start K worker processes on this machine and watch them.

The launcher does what ``torchrun --nproc-per-node K`` does for gradkit, with no extra tool: it hosts
the rendezvous store (so the store outlives any worker), starts one process per stage with the
``RANK``/``WORLD_SIZE``/``MASTER_*`` variables set, forwards Ctrl-C to them once (they agree on a step,
save a checkpoint and exit), and makes sure none outlives the run: when one worker fails, the others
get :data:`GRACE_S` seconds to stop on their own (their watchdogs usually stop them within a second)
and are then killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from gradkit.config import TrainConfig
from gradkit.data import DATASETS
from gradkit.distributed import shm
from gradkit.distributed.backend import check_stage_parallel_config
from gradkit.distributed.context import AGENT_STORE_ENV, RUN_ID_ENV
from gradkit.distributed.rank import LAUNCHER_PID_ENV
from gradkit.errors import print_line
from gradkit.methods import METHODS, check_options
from gradkit.models import MODELS
from gradkit.run_folder import RunFolder
from gradkit.stages import default_threads

__all__ = ["GRACE_S", "LAUNCHER_PID_ENV", "launch", "launch_spec"]

GRACE_S = float(os.environ.get("GRADKIT_GRACE_S", "10"))
"""Seconds the surviving workers get to stop by themselves after one failed, before they are killed."""
INTERRUPTED = 130


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_spec(config: TrainConfig) -> dict[str, Any]:
    """What a worker process needs besides its environment: the configuration, and the modules that
    registered a method, model or dataset outside gradkit (imported first, with this process's
    ``sys.path``, as ``multiprocessing``'s spawn does), so a user's own method runs on workers too."""
    plugins = {registry.module(str(name)) for registry, name in
               ((METHODS, config.method), (MODELS, config.model), (DATASETS, config.data))}
    return {
        "config": config.to_dict(),
        "sys_path": [p for p in sys.path if p],
        "plugins": sorted(m for m in plugins if m and m != "gradkit" and not m.startswith("gradkit.")),
    }


def launch(config: TrainConfig, workers: int) -> int:
    """Train ``config`` with ``workers`` processes, one stage each; returns the exit code.

    0 when every worker finished, 130 after Ctrl-C (a checkpoint was saved), otherwise the code of
    the first worker that failed (its one-line message is on stderr).
    """
    check_stage_parallel_config(config, workers)  # one-line errors before any process starts
    check_options(config.method, config.method_options, stage_parallel=True)  # once, not once per rank
    assert config.out is not None
    folder = RunFolder(config.out)
    # The launcher owns the folder for the run's life (its workers write under this lock).
    lock = folder.lock(create=not config.resume)
    try:
        folder.remove_stale_temp_files()
        if config.resume:
            # A missing, unreadable or damaged checkpoint is reported before any worker starts
            # (rank 0 reports a fallback to the previous checkpoint).
            folder.read_manifest(report=False)
        else:
            folder.check_new_run()
        return _launch_locked(config, workers, folder)
    finally:
        lock.release()


def _launch_locked(config: TrainConfig, workers: int, folder: RunFolder) -> int:
    out = folder.path
    folder.prepare()
    spec = folder.write_launch_spec(launch_spec(config))
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, None, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    threads = config.threads or default_threads(workers)
    run_id = uuid.uuid4().hex[:12]
    procs = []
    for rank in range(workers):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads), **{AGENT_STORE_ENV: "1", RUN_ID_ENV: run_id,
                                                     LAUNCHER_PID_ENV: str(os.getpid())})
        # c10d logs a multi-KB C++ trace as a *warning* whenever a socket closes (the launcher or a peer
        # gone); the workers report such failures in one line of their own.
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads steal cores from the other stages
        # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
        procs.append(subprocess.Popen([sys.executable, "-m", "gradkit.distributed.rank", str(spec)],
                                      env=env, start_new_session=True))
    interrupts = 0

    def forward(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if interrupts == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failure: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0, INTERRUPTED) and first_failure is None:
                    first_failure = (rank, code)
                    deadline = time.monotonic() + GRACE_S
                    if code < 0 and not store.check(["gradkit/failed"]):
                        # Killed, so it could not say so itself: tell the others who failed.
                        store.set("gradkit/failed", json.dumps({"rank": rank, "message": _describe(code)}))
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:  # never leave a worker behind, whatever happened here
            if p.poll() is None:
                p.kill()
                p.wait()
        folder.remove_launch_spec()
        shm.cleanup(run_id)
    if first_failure is None:
        # Workers that all ended between two polls never went through the loop's check.
        failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode not in (0, INTERRUPTED)]
        first_failure = failed[0] if failed else None
    if first_failure is not None:
        rank, code = first_failure
        if code < 0:
            print_line(f"gradkit train: error: rank {rank} {_describe(code)}; the other workers stopped; "
                       f"the last good checkpoint in {out} is kept (continue with --resume)")
        return code if code > 0 else 1
    codes = [p.returncode for p in procs]
    return INTERRUPTED if INTERRUPTED in codes else 0
