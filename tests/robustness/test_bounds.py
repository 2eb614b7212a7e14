"""Sizes that used to crash the process (issue 15): each is refused with exit code 2 and one line on
stderr that names the option and what would work, with no traceback and no signal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradkit import TrainConfig
from gradkit.compress import MAX_GROUP_SIZE
from gradkit.config import MAX_THREADS
from gradkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MEMORY = ["memory", "--model", "mlp", "--data", "digits", "--batch-size", "64", "--activations", "int4"]
TRAIN = ["train", "--model", "mlp", "--data", "digits", "--batch-size", "64", "--epochs", "1",
         "--limit-train", "64", "--limit-test", "32", "--no-progress"]


def _gradkit(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"),
                                                       *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "gradkit", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    ("argv", "option", "hint"),
    [
        ([*MEMORY, "--group-size", "8192"], "--group-size", str(MAX_GROUP_SIZE)),
        ([*TRAIN, "--activations", "int4", "--activation-group-size", "8192", "--out", "run"],
         "--activation-group-size", str(MAX_GROUP_SIZE)),
        ([*MEMORY, "--threads", "100000"], "--threads", str(MAX_THREADS)),
        ([*TRAIN, "--threads", "100000", "--out", "run"], "--threads", str(MAX_THREADS)),
    ],
    ids=["memory-group-size", "train-activation-group-size", "memory-threads", "train-threads"],
)
def test_out_of_bounds_sizes_exit_2_with_one_line(argv: list[str], option: str, hint: str, tmp_path: Path) -> None:
    proc = _gradkit(*argv, tmp_path=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not -11 (SIGSEGV) or 130
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "interrupted" not in proc.stderr
    assert option in lines[0] and hint in lines[0], lines[0]  # names the problem and the limit
    assert not (tmp_path / "run").exists()


def test_the_maximum_group_size_itself_works(tmp_path: Path) -> None:
    proc = _gradkit(*MEMORY, "--group-size", str(MAX_GROUP_SIZE), "--json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"stored_bytes"' in proc.stdout


@pytest.mark.parametrize("size", [MAX_GROUP_SIZE + 8, 8192, 12])
def test_train_config_refuses_group_sizes_the_kernels_cannot_hold(size: int) -> None:
    with pytest.raises(ConfigError, match=f"at most {MAX_GROUP_SIZE}"):
        TrainConfig(activations="int4", activation_group_size=size)


def test_train_config_refuses_absurd_thread_counts() -> None:
    with pytest.raises(ConfigError, match="--threads must be at most"):
        TrainConfig(threads=100_000)
    assert TrainConfig(threads=MAX_THREADS).threads == MAX_THREADS
