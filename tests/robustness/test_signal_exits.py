"""Issue 15 item 7: Ctrl-C and SIGTERM end in one line and exit 130, never a traceback; a SIGTERMed run
resumes to the weights of an uninterrupted one; workers whose launcher was SIGKILLed stop with one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradkit.backend import LocalBackend
from gradkit.cli import main

SMALL = ["--model", "mlp", "--data", "digits", "--limit-train", "256", "--limit-test", "64", "--epochs", "2",
         "--batch-size", "32", "--threads", "1", "--no-progress"]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_sigterm_mid_epoch_saves_and_resumes_to_the_uninterrupted_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "train", *SMALL, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    real_step = LocalBackend.train_step
    steps = []

    def step_then_sigterm(self: LocalBackend, x: torch.Tensor, y: torch.Tensor) -> float:
        steps.append(1)
        if len(steps) == 3:  # epoch 1 has 8 steps: stop in the middle of it
            os.kill(os.getpid(), signal.SIGTERM)  # through the real handler of gradkit.signals
        return real_step(self, x, y)

    monkeypatch.setattr(LocalBackend, "train_step", step_then_sigterm)
    out = tmp_path / "stopped"
    assert main(["-q", "train", *SMALL, "--out", str(out)]) == 130
    line = one_line(capsys)
    assert line.startswith("gradkit train: interrupted at epoch 1 step 3; checkpoint saved")
    assert "error" not in line and not (out / "model.pt").exists()
    monkeypatch.setattr(LocalBackend, "train_step", real_step)

    assert main(["-q", "train", *SMALL, "--out", str(out), "--resume"]) == 0
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(out / "model.pt", weights_only=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_ctrl_c_while_data_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # what SIGINT's default handler raises before the loop installs its own

    monkeypatch.setattr("gradkit.backend.load_dataset", interrupted)
    out = tmp_path / "run"
    assert main(["-q", "train", *SMALL, "--out", str(out)]) == 130
    assert one_line(capsys) == "gradkit train: interrupted before training started; nothing was written"
    assert list(out.iterdir()) == []


def test_ctrl_c_after_the_command_ended_prints_nothing() -> None:
    """A second Ctrl-C while the interpreter shuts down used to print "Exception ignored in atexit
    callback" and a KeyboardInterrupt trace."""
    code = ("import os, signal, sys, time\n"
            "from gradkit.cli import main\n"
            "sys.argv = ['gradkit', 'schedule', '--steps', '1']\n"
            "code = main()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.2)\n"
            "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""


def _workers_of(out: Path) -> list[int]:
    """Pids of worker processes started for the run folder ``out`` (their command names launch.json)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gradkit.distributed.rank" in cmdline and str(out).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_with_one_line_when_the_launcher_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradkit", "-q", "train", "--method", "fr", "--stages", "2", "--workers", "2",
           *SMALL, "--epochs", "1000", "--out", str(out)]
    launcher = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.json").is_file():
            assert launcher.poll() is None, launcher.stderr.read() if launcher.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        workers = _workers_of(out)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while _workers_of(out):
            assert time.monotonic() < deadline, "workers outlived their launcher by 30 s"
            time.sleep(0.2)
        err = launcher.stderr.read() if launcher.stderr else ""  # the workers inherited this pipe
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in _workers_of(out):
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in err and "DistNetworkError" not in err and "frame #" not in err
    # rank 0 logs its progress (the workers do not get -q); what the kill caused is one line
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"(loaded |epoch \d+: )", ln)]
    assert len(lines) == 1, err
    assert "the launcher" in lines[0] and "is gone" in lines[0] and "continue with --resume" in lines[0]
    assert not (out / "launch.json").exists()
    assert (out / "checkpoint.json").is_file()
