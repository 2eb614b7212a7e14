"""One process per stage (issue #4): same numbers as one process, faults that end cleanly, resume.

These tests start real worker processes (the launcher of ``gradkit train --workers``, and torchrun),
so each takes a few seconds of process start-up. The single-process reference runs in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradkit.cli import main

# 600 digits with batches of 64: 9 full batches and a last one of 24 samples.
COMMON = ["--model", "mlp", "--data", "digits", "--limit-train", "600", "--limit-test", "200",
          "--batch-size", "64", "--threads", "1", "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _gradkit(args: list[str], *, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradkit", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _assert_same_run(a: Path, b: Path, *, memory: bool = True) -> None:
    ha, hb = _history(a), _history(b)
    if memory:  # activation bytes per stage (a resumed run keeps those measured before the stop)
        assert [_memory(r) for r in ha] == [_memory(r) for r in hb]
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    assert [r["test_acc"] for r in ha] == [r["test_acc"] for r in hb]
    # dni's per-stage counts of synthetic updates: gathered from the workers, the same as in one process.
    assert [r.get("synthetic_updates") for r in ha] == [r.get("synthetic_updates") for r in hb]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _memory(record: dict) -> list[dict[str, int]]:
    """A record's bytes per stage, kinds of buffer a stage does not have left out (a method lists
    the kinds it knows, at 0 where a stage holds none of them)."""
    return [{kind: n for kind, n in stage.items() if n} for stage in record["stage_memory"]]


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference: each method with 2 stages in this process, 2 epochs."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for method in ("fr", "ddg", "dni", "bp"):
        out = root / method
        assert main(["-q", "train", "--method", method, "--stages", "2", "--epochs", "2", *COMMON,
                     "--out", str(out)]) == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("method", ["fr", "ddg", "dni", "bp"])
def test_two_workers_equal_one_process(method: str, single_process_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "workers"
    done = _gradkit(["train", "--method", method, "--stages", "2", "--workers", "2", "--epochs", "2", *COMMON,
                     "--out", str(out)])
    assert done.returncode == 0, done.stderr
    _assert_same_run(single_process_runs[method], out, memory=False)
    # Activation memory: each worker measures the stage it holds, and the joined figures are one
    # process's, but for what crosses the boundary. Stage 1 saves its input (the ReLU output of mlp's
    # first block, 64 x 256 floats) and the loss its labels (64 int64). One process counts a storage
    # once, under stage 0 where stage 0 keeps it too (its graph saves its ReLU's output, except fr's,
    # which replays; dni's stored outputs also keep the labels); two workers each hold a copy.
    one, two = _history(single_process_runs[method])[-1], _history(out)[-1]
    assert _memory(two)[0] == _memory(one)[0]
    extra = two["stage_memory"][1]["saved_bytes"] - one["stage_memory"][1]["saved_bytes"]
    assert extra == {"fr": 0, "dni": 64 * 256 * 4 + 64 * 8}.get(method, 64 * 256 * 4)
    assert two["activation_bytes"] == one["activation_bytes"] + extra
    # The last, smaller batch is trained on once: every sample counted once per epoch, none padded.
    assert [r["samples"] for r in _history(out)] == [600, 600]
    assert json.loads((out / "config.json").read_text())["workers"] == 2


def test_gloo_payloads_equal_shared_memory(single_process_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gloo"
    done = _gradkit(["train", "--method", "fr", "--stages", "2", "--workers", "2", "--epochs", "2", *COMMON,
                     "--out", str(out)], GRADKIT_SHM="0")
    assert done.returncode == 0, done.stderr
    _assert_same_run(single_process_runs["fr"], out)


def test_torchrun_ranks_equal_one_process(single_process_runs: dict[str, Path], tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "torchrun"
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "gradkit", "-q", "train", "--method", "fr",
         "--stages", "2", "--epochs", "2", *COMMON, "--out", str(out)],
        capture_output=True, text=True, timeout=180, env=_env(),
    )
    assert done.returncode == 0, done.stderr
    _assert_same_run(single_process_runs["fr"], out)
    assert not list(Path("/dev/shm").glob("gradkit-*-activation-*")), "shared-memory files left behind"


@pytest.mark.parametrize("args, message", [
    (["--method", "fr", "--stages", "3", "--workers", "2"], "--stages 3 with 2 workers"),
    (["--method", "ulr", "--stages", "2", "--workers", "2"], "needs the whole model in one process"),
    (["--method", "fr", "--stages", "2", "--workers", "2", "--measure-direction", "5"], "--measure-direction"),
])
def test_bad_options_fail_before_any_worker_starts(args: list[str], message: str, tmp_path: Path) -> None:
    done = _gradkit(["train", *args, *COMMON, "--out", str(tmp_path / "run")], timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_data_the_model_cannot_read_ends_every_rank_in_one_line_and_exit_2(tmp_path: Path) -> None:
    # Every rank fails at the same moment (the probe forward after building the model): the launcher
    # must still see their exit codes (workers that all ended between two of its polls were once taken
    # as a finished run, which then had no metrics.jsonl).
    done = _gradkit(["train", "--method", "fr", "--stages", "2", "--workers", "2", "--model", "mlp", "--data", "text",
                     "--limit-train", "32", "--limit-test", "8", "--batch-size", "16", "--epochs", "1",
                     "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")], timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert sorted(line.split(":")[2].strip() for line in errors) == ["rank 0", "rank 1"], done.stderr
    assert all("model mlp cannot read the examples of text" in line for line in errors)
    assert "Traceback" not in done.stderr and "run folder" not in done.stderr


# -- faults and interrupts -------------------------------------------------------------------------
# 800 digits in batches of 4: 200 steps, about a second per epoch, long enough to stop a run mid-epoch.
LONG = ["--method", "fr", "--stages", "2", "--workers", "2", "--model", "mlp", "--data", "digits",
        "--limit-train", "800", "--batch-size", "4", "--lr", "0.01", "--epochs", "3", "--threads", "1",
        "--no-progress"]


def _worker_pid(out: Path, rank: int, deadline: float) -> int:
    """The pid of the worker of ``rank`` started for run ``out`` (found through /proc)."""
    spec = str(out / "launch.json")
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if spec.encode() in cmdline and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} for {out}")


def _wait_for_checkpoint(out: Path, deadline: float) -> None:
    while not (out / "checkpoint.json").exists():
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


def _no_workers_left(out: Path) -> bool:
    spec = str(out / "launch.json").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if spec in (entry / "cmdline").read_bytes():
                    return False
            except OSError:
                pass
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("long") / "run"
    done = _gradkit(["train", *LONG, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_worker_ends_the_run_and_resume_completes(fault: str, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "gradkit", "train", *LONG, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(GRADKIT_PEER_TIMEOUT_S="4", GRADKIT_GRACE_S="2"))
    deadline = time.monotonic() + 120
    _wait_for_checkpoint(out, deadline)
    victim = _worker_pid(out, 1, deadline)
    os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    start = time.monotonic()
    _, stderr = launcher.communicate(timeout=90)
    assert time.monotonic() - start < 60
    assert launcher.returncode != 0
    assert _no_workers_left(out)
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert errors and all("rank 1" in line for line in errors), stderr
    assert "Traceback" not in stderr
    # The last good checkpoint is intact: resuming finishes with exactly the uninterrupted result.
    done = _gradkit(["train", *LONG, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(uninterrupted, out)


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "gradkit", "train", *LONG, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_checkpoint(out, time.monotonic() + 120)
    time.sleep(0.5)  # into the next epoch, so the stop is mid-epoch
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=90)
    assert launcher.returncode == 130, stderr
    assert "interrupted at epoch" in stderr and "Traceback" not in stderr
    assert _no_workers_left(out)
    done = _gradkit(["train", *LONG, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(uninterrupted, out)


def test_stages_auto_prints_its_choice_and_trains_with_it(tmp_path: Path) -> None:
    out = tmp_path / "auto"
    done = _gradkit(["train", "--method", "fr", "--stages", "auto", "--workers", "2", "--epochs", "1", *COMMON,
                     "--out", str(out)])
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("fr with up to 2 workers: K=") and "predicted step" in done.stdout
    chosen = int(first.split("K=")[1].split()[0])
    saved = json.loads((out / "config.json").read_text())
    assert saved["stages"] == chosen and len(saved["stage_sizes"]) == chosen
    assert _history(out)[-1]["samples"] == 600


# -- activations with one process per stage ------------------------------------------------------
def _single_and_workers(tmp_path: Path, extra: list[str]) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--method", "fr", "--stages", "2", "--epochs", "2", *COMMON, *extra]
    assert main(["-q", *args, "--out", str(one)]) == 0
    done = _gradkit([*args, "--workers", "2", "--out", str(two)])
    assert done.returncode == 0, done.stderr
    return one, two


def test_deterministic_activations_give_the_same_bits_with_workers(tmp_path: Path) -> None:
    """blpa8 rounds to nearest, so compression draws no random numbers: one process per stage must
    compute exactly what one process does, the drain of ``flush()`` (compressed in both) included."""
    one, two = _single_and_workers(tmp_path, ["--activations", "blpa8"])
    _assert_same_run(one, two)
    exact = tmp_path / "exact"
    assert main(["-q", "train", "--method", "fr", "--stages", "2", "--epochs", "2", *COMMON,
                 "--out", str(exact)]) == 0
    assert _history(exact)[-1]["train_loss"] != _history(one)[-1]["train_loss"], "blpa8 compressed nothing"


def test_stochastic_activations_with_workers_match_one_process_statistically(tmp_path: Path) -> None:
    """int4 rounds stochastically from each process's own random stream: the runs differ in the
    draws, not in what they compute. Tolerance: 2% of the loss per epoch and 3 points of accuracy
    (measured on this setup: 0.08% of the loss and 0.5 points apart)."""
    one, two = _single_and_workers(tmp_path, ["--activations", "int4"])
    for a, b in zip(_history(one), _history(two), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.02 * a["train_loss"], (a["train_loss"], b["train_loss"])
        assert abs(a["test_acc"] - b["test_acc"]) <= 0.03
    assert _history(one)[-1]["train_loss"] < 0.5 * _history(one)[0]["train_loss"]
