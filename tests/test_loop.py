"""The training loop: metrics, checkpoints, exact resume, Ctrl-C and divergence handling."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from gradkit import RunInterrupted, TrainConfig, TrainingDiverged, train
from gradkit.checkpoint import load_checkpoint
from gradkit.data import Dataset
from gradkit.errors import ConfigError
from gradkit.methods import Backprop

REQUIRED_KEYS = {"epoch", "train_loss", "test_loss", "test_acc", "epoch_seconds", "samples_per_second"}


def config(out: Path | None, **kw: object) -> TrainConfig:
    base = dict(method="bp", model="mlp", data="blobs", epochs=3, batch_size=32, lr=0.05,
                seed=3, progress=False, out=str(out) if out else None)
    base.update(kw)
    return TrainConfig(**base)


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(run_dir: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_loss"], r["test_loss"], r["test_acc"]) for r in rows]


def test_metrics_and_run_folder(tmp_path: Path, blobs: Dataset) -> None:
    result = train(config(tmp_path / "run"), dataset=blobs)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for n, rec in enumerate(records, start=1):
        assert REQUIRED_KEYS <= rec.keys()
        assert rec["epoch"] == n
        assert 0.0 <= rec["test_acc"] <= 1.0
        assert rec["samples_per_second"] > 0 and rec["activation_bytes"] > 0
    assert records[-1]["test_acc"] > 0.9  # blobs are easy: the loop really trains
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.final == records[-1]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "mlp"


def test_resume_after_crash_gives_the_same_weights(tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "full"), dataset=blobs)

    def crash(epoch: int, step: int, loss: float) -> None:
        if epoch == 1 and step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "cut"), dataset=blobs, on_step=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1  # last good one kept
    train(config(tmp_path / "cut", resume=True), dataset=blobs)
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_ctrl_c_mid_epoch_saves_exact_position_and_resume_matches(tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "full"), dataset=blobs)

    def ctrl_c(epoch: int, step: int, loss: float) -> None:
        if epoch == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted, match="continue with --resume"):
        train(config(tmp_path / "cut"), dataset=blobs, on_step=ctrl_c)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 5)
    train(config(tmp_path / "cut", resume=True), dataset=blobs)
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, blobs: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_step = Backprop.step

    def step(self, x, y):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return float("nan") if calls["n"] == 15 else real_step(self, x, y)

    monkeypatch.setattr(Backprop, "step", step)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2 step 3; the last good checkpoint"):
        train(config(tmp_path / "run"), dataset=blobs)  # 12 steps per epoch
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["epoch"] == 1 and len(losses(tmp_path / "run")) == 1


def test_existing_run_needs_resume(tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "run", epochs=1), dataset=blobs)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(config(tmp_path / "run", epochs=1), dataset=blobs)


def test_resume_refuses_changed_options(tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "run", epochs=1), dataset=blobs)
    with pytest.raises(ConfigError, match=r"batch_size=32 \(now 16\)"):
        train(config(tmp_path / "run", epochs=2, batch_size=16, resume=True), dataset=blobs)


def test_resume_can_extend_epochs(tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "run", epochs=1, lr_schedule="constant"), dataset=blobs)
    result = train(config(tmp_path / "run", epochs=2, lr_schedule="constant", resume=True), dataset=blobs)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_stages_split_is_saved_and_too_many_stages_is_an_error(tmp_path: Path, blobs: Dataset) -> None:
    result = train(config(tmp_path / "run", epochs=1, stages=2), dataset=blobs)
    assert len(result.stage_sizes) == 2
    with pytest.raises(ConfigError, match="use --stages <="):
        train(config(None, epochs=1, stages=50), dataset=blobs)


def test_warmup_steps_count_across_epochs(blobs: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradkit.methods import Method
    factors: list[float] = []
    original = Method.set_lr_factor

    def record(self: Method, factor: float) -> None:
        factors.append(factor)
        original(self, factor)

    monkeypatch.setattr(Method, "set_lr_factor", record)
    result = train(config(None, epochs=2, lr_schedule="constant", warmup_steps=16), dataset=blobs)
    # 384 samples / 32 = 12 steps per epoch: the warm-up runs into the second epoch.
    assert factors == pytest.approx([min(1.0, (s + 1) / 16) for s in range(24)])
    assert result.method is not None
    assert result.method.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
