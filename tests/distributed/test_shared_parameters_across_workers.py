"""A tied embedding with one process per stage (issue 14, item 2): the ranks holding it all-reduce its
gradient each step, so ``--workers 2`` gives the same bits as one process (and as plain backprop)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.cli import main
from gradkit.distributed.backend import _check_no_shared_buffers
from gradkit.errors import ConfigError
from gradkit.stages import split

WORDS = "the quick brown fox jumps over a lazy dog while cats sit on warm mats and birds sing".split()


@pytest.fixture(scope="module")
def common(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    text = tmp_path_factory.mktemp("text") / "words.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)), encoding="utf-8")
    # 128 windows of 16 characters, batches of 32: 4 steps per epoch, 2 epochs (an evaluation between).
    return ["--model", "gpt", "--model-option", "layers=1", "--model-option", "width=16", "--model-option", "heads=2",
            "--data", "text", "--data-option", f"path={text}", "--data-option", "context=16",
            "--limit-train", "128", "--limit-test", "32", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.01",
            "--epochs", "2", "--stages", "2", "--threads", "1", "--no-progress"]


def _workers(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "gradkit", "train", "--workers", "2", *args],
                          capture_output=True, text=True, timeout=180, env=env)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_bits(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    wa, wb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert torch.equal(wb["embed.token.weight"], wb["head.proj.weight"])


@pytest.mark.parametrize("method", ["bp", "fr"])
def test_a_tied_embedding_with_two_workers_equals_one_process(method: str, common: list[str], tmp_path: Path) -> None:
    """bp: one process runs plain backprop (one optimizer over the whole model), the workers its stage
    pipeline; fr: the same method both ways. Rank 0 also checks at each evaluation that both ranks'
    copies of the tied weight are equal."""
    single, workers = tmp_path / "single", tmp_path / "workers"
    assert main(["-q", "train", "--method", method, *common, "--out", str(single)]) == 0
    done = _workers(["--method", method, *common, "--out", str(workers)])
    assert done.returncode == 0, done.stderr
    _assert_same_bits(single, workers)


def test_a_buffer_two_stages_hold_is_a_config_error_with_workers() -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    stages = split(nn.Sequential(block, nn.ReLU(), block), sizes=[1, 2])
    with pytest.raises(ConfigError, match=r"buffer 0\.1\.running_mean is used by stages 0, 1.*keep a block with buffers"):
        _check_no_shared_buffers(stages)
    _check_no_shared_buffers(split(nn.Sequential(block, nn.ReLU(), nn.Linear(4, 2)), sizes=[1, 2]))
