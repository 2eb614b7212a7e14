"""Nothing lost (issue 15): one run per folder, verified checkpoints with a fallback, no orphans,
recovering from divergence, and SIGKILL at random moments.

Every refusal is exit code 2 with exactly one stderr line and leaves the run folder byte-identical
(``.lock`` aside: it holds the pid of the last process that owned the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradkit.cli import main
from gradkit.run_folder import RunFolder

COMMON = ["--model", "mlp", "--data", "digits", "--limit-train", "256", "--limit-test", "64",
          "--batch-size", "64", "--lr-schedule", "constant", "--threads", "1", "--no-progress"]
WORKERS = ["--method", "bp", "--stages", "2", "--workers", "2"]


def _train(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """``gradkit -q train ...`` in this process (workers are subprocesses); exit code and stderr lines."""
    capfd.readouterr()
    code = main(["-q", "train", *COMMON, *args])
    return code, capfd.readouterr().err.splitlines()


def _one_line(err: list[str], *needles: str) -> str:
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # tensor bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def single_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished single-process run of 3 epochs: the reference."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["-q", "train", *COMMON, "--epochs", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def workers_2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``--workers 2`` run of 2 epochs (its checkpoint and the previous one are kept)."""
    out = tmp_path_factory.mktemp("workers") / "run"
    assert main(["-q", "train", *COMMON, *WORKERS, "--epochs", "2", "--out", str(out)]) == 0
    return out


# -- one run per folder ------------------------------------------------------------------------------
def test_fresh_workers_run_refuses_a_single_process_run(single_3: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(single_3, out)
    before = _snapshot(out)
    code, err = _train(capfd, *WORKERS, "--epochs", "1", "--out", str(out))
    assert code == 2
    _one_line(err, "already holds a run", "--resume")
    assert _snapshot(out) == before


def test_fresh_single_process_run_refuses_a_workers_run(workers_2: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(workers_2, out)
    before = _snapshot(out)
    code, err = _train(capfd, "--epochs", "1", "--out", str(out))
    assert code == 2
    _one_line(err, "already holds a run", "--resume")
    assert _snapshot(out) == before


@pytest.mark.parametrize("kind", ["single", "workers", "resume"])
def test_a_second_run_into_a_folder_in_use_is_refused(kind: str, single_3: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(single_3, out)
    before = _snapshot(out)
    args = {"single": ["--epochs", "1"], "workers": [*WORKERS, "--epochs", "1"],
            "resume": ["--epochs", "4", "--resume"]}[kind]
    with RunFolder(out).lock():  # the first run, as far as the folder can tell
        code, err = _train(capfd, *args, "--out", str(out))
    assert code == 2
    _one_line(err, f"{out} is in use by another gradkit run (pid {os.getpid()})", "choose another --out")
    assert _snapshot(out) == before
    # The lock went with its holder: now the folder can be resumed.
    code, _ = _train(capfd, "--epochs", "3", "--resume", "--out", str(out))
    assert code == 0


def test_a_running_process_holds_the_lock_until_it_dies(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gradkit.run_folder import RunFolder; "
                               f"RunFolder({str(out)!r}).lock(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"in use by another gradkit run \\(pid {holder.pid}\\)"):
            RunFolder(out).lock()
    finally:
        holder.kill()
        holder.wait()
    RunFolder(out).lock().release()  # SIGKILL released it


# -- digests and the fallback -----------------------------------------------------------------------
def test_flipped_bit_in_checkpoint_resumes_from_the_previous_one(single_3: Path, tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(capfd, "--epochs", "2", "--out", str(out))[0] == 0  # cut after 2 of 3 epochs
    assert (out / "checkpoint.prev.pt").is_file()
    _flip_bit(out / "checkpoint.pt")
    code, err = _train(capfd, "--epochs", "3", "--resume", "--out", str(out))
    assert code == 0
    _one_line(err, "checkpoint.pt is damaged", "resuming from the previous checkpoint", "checkpoint.prev.pt")
    _assert_same_weights(out, single_3)
    assert [r["train_loss"] for r in _history(out)] == [r["train_loss"] for r in _history(single_3)]


def test_flipped_bit_in_the_only_checkpoint_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(capfd, "--epochs", "1", "--out", str(out))[0] == 0
    assert not (out / "checkpoint.prev.pt").exists()
    _flip_bit(out / "checkpoint.pt")
    before = _snapshot(out)
    code, err = _train(capfd, "--epochs", "2", "--resume", "--out", str(out))
    assert code == 2
    _one_line(err, "checkpoint.pt is damaged", "no previous good checkpoint")
    assert _snapshot(out) == before


@pytest.mark.slow
def test_flipped_bit_in_a_shard_resumes_from_the_previous_step(workers_2: Path, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(workers_2, out)
    manifest = json.loads((out / "checkpoint.json").read_text())
    previous = json.loads((out / "checkpoint.prev.json").read_text())
    assert previous["epoch"] == 1 and manifest["epoch"] == 2
    assert (out / "checkpoint" / previous["step_folder"] / "rank1.pt").is_file()
    _flip_bit(out / "checkpoint" / manifest["step_folder"] / "rank1.pt")
    code, err = _train(capfd, *WORKERS, "--epochs", "2", "--resume", "--out", str(out))
    assert code == 0
    assert any("rank1.pt is damaged" in line and "previous checkpoint" in line for line in err), err
    assert not any("Traceback" in line for line in err)
    _assert_same_weights(out, workers_2)
    assert [r["train_loss"] for r in _history(out)] == [r["train_loss"] for r in _history(workers_2)]
    # The next checkpoint keeps the verified one before it, not the damaged one.
    assert json.loads((out / "checkpoint.prev.json").read_text())["history"] == _history(out)[:1]


def test_flipped_bit_in_a_shard_without_previous_is_one_line(workers_2: Path, tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(workers_2, out)
    (out / "checkpoint.prev.json").unlink()
    manifest = json.loads((out / "checkpoint.json").read_text())
    _flip_bit(out / "checkpoint" / manifest["step_folder"] / "rank0.pt")
    before = _snapshot(out)
    code, err = _train(capfd, *WORKERS, "--epochs", "3", "--resume", "--out", str(out))
    assert code == 2
    _one_line(err, "rank0.pt is damaged", "no previous good checkpoint")
    assert _snapshot(out) == before


# -- orphans ---------------------------------------------------------------------------------------
def test_stale_temp_files_are_removed_on_resume(single_3: Path, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(single_3, out)
    stale = [out / ".checkpoint.pt.k3j_x9a0.tmp", out / ".metrics.jsonl.abcdefgh.tmp",
             out / ".checkpoint.prev.pt.linktemp.tmp"]
    mine = [out / ".notes.txt.abcdefgh.tmp", out / "checkpoint.pt.abcdefgh.tmp"]  # not gradkit's
    for path in stale + mine:
        path.write_bytes(b"partial")
    assert _train(capfd, "--epochs", "3", "--resume", "--out", str(out))[0] == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in mine)


# -- recovering from divergence ------------------------------------------------------------------------
def test_resume_with_a_lower_lr_after_divergence(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(capfd, "--epochs", "1", "--lr", "0.05", "--out", str(out))[0] == 0
    code, err = _train(capfd, "--epochs", "2", "--lr", "1e12", "--resume", "--out", str(out))
    assert code == 1
    _one_line(err, "loss became", f"the last good checkpoint {out / 'checkpoint.pt'} (verified)", "lower --lr")
    code, err = _train(capfd, "--epochs", "2", "--lr", "0.01", "--weight-decay", "0", "--resume", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01 and config["weight_decay"] == 0
    # The diverged attempt was rolled back with its position: only the change that stuck is recorded.
    assert config["resume_changes"] == [{"epoch": 1, "step_in_epoch": 0, "global_step": 4,
                                         "changes": {"lr": [0.05, 0.01], "weight_decay": [5e-4, 0]}}]
    history = _history(out)
    assert "changes" not in history[0]
    assert history[1]["changes"] == {"lr": [0.05, 0.01], "weight_decay": [5e-4, 0]}
    assert history[1]["lr"] == 0.01 and all(map(lambda r: r["train_loss"] == r["train_loss"], history))


def test_resume_still_refuses_changes_of_what_is_trained(single_3: Path, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(single_3, out)
    before = _snapshot(out)
    code, err = _train(capfd, "--epochs", "4", "--optimizer", "adam", "--resume", "--out", str(out))
    assert code == 2
    _one_line(err, "optimizer='sgd' (now 'adam')")
    assert _snapshot(out) == before


def test_resume_of_a_finished_run_with_fewer_epochs_keeps_the_folder(single_3: Path, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(single_3, out)
    before = _snapshot(out)
    assert _train(capfd, "--epochs", "1", "--resume", "--out", str(out))[0] == 0
    assert _snapshot(out) == before
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


# -- SIGKILL at random moments ------------------------------------------------------------------------------
KILL_RUN = ["--model", "mlp", "--data", "digits", "--limit-train", "1024", "--limit-test", "64",
            "--batch-size", "16", "--epochs", "12", "--threads", "1", "--no-progress"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert main(["-q", "train", *KILL_RUN, "--out", str(reference)]) == 0
    out = tmp_path / "run"
    rng = random.Random(15)
    kills = 0
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for _ in range(4):
        resume = ["--resume"] if RunFolder(out).holds_single_process_run() else []
        proc = subprocess.Popen([sys.executable, "-m", "gradkit", "-q", "train", *KILL_RUN, *resume, "--out", str(out)],
                                env=env, stderr=subprocess.PIPE, text=True)
        # Count from the moment the process owns the folder (it writes its pid into .lock), not from
        # interpreter start-up, which takes seconds on a loaded machine.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            lock = out / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(proc.pid):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.5, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            break
    assert kills >= 1
    resume = ["--resume"] if RunFolder(out).holds_single_process_run() else []
    assert main(["-q", "train", *KILL_RUN, *resume, "--out", str(out)]) == 0
    _assert_same_weights(out, reference)
    assert [r["train_loss"] for r in _history(out)] == [r["train_loss"] for r in _history(reference)]
    assert not list(out.glob(".*.tmp"))


def test_a_refused_fresh_run_leaves_no_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new"
    code, err = _train(capfd, "--epochs", "1", "--stages", "50", "--out", str(out))
    assert code == 2
    _one_line(err, "--stages")
    # The command line proves --out writable (creating it) before anything loads; the run itself
    # leaves nothing in it, not even its lock.
    assert not out.exists() or list(out.iterdir()) == []


def test_stale_shard_temp_files_are_gradkits_own_only(tmp_path: Path) -> None:
    step = tmp_path / "checkpoint" / "step-00000004"
    step.mkdir(parents=True)
    stale = [step / ".rank1.pt.abc_1234.tmp", tmp_path / ".checkpoint.json.zzzzzzzz.tmp",
             tmp_path / ".checkpoint.prev.json.a1b2c3d4.tmp"]
    kept = [step / ".notes.abc_1234.tmp", tmp_path / ".rank1.pt.abc_1234.tmp", step / "rank1.pt"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(RunFolder(tmp_path).remove_stale_temp_files()) == sorted(stale)
    assert all(p.exists() for p in kept)
