"""The CUDA-only paths (marker ``gpu``; skipped without a GPU; ``make gpu-check`` runs them).

Resume of every pipelined method with its in-flight buffers on the GPU, ``--balance time``,
``--stages auto``'s planning, ``--measure-direction``, bf16 autocast, and ``gradkit memory --device
cuda`` (measured peak, ``--max-batch``). Equalities on CUDA are to 1e-6 rather than bit-for-bit:
cuBLAS may pick different kernels between processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from gradkit import RunInterrupted, TrainConfig, train
from gradkit.checkpoint import load_checkpoint
from gradkit.cli import main
from gradkit.data import Dataset

pytestmark = pytest.mark.gpu


def config(out: Path | None, **kw: object) -> TrainConfig:
    base = dict(method="fr", stages=3, balance="count", model="mlp", data="blobs", epochs=3, batch_size=32,
                lr=0.05, seed=3, progress=False, device="cuda", out=str(out) if out else None)
    base.update(kw)
    return TrainConfig(**base)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fr", "ddg", "dni"])
def test_resume_on_cuda_with_batches_in_flight_equals_the_uninterrupted_run(
        method: str, tmp_path: Path, blobs: Dataset) -> None:
    train(config(tmp_path / "full", method=method), dataset=blobs)

    def ctrl_c(epoch: int, step: int, loss: float) -> None:
        if epoch == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        train(config(tmp_path / "cut", method=method), dataset=blobs, on_step=ctrl_c)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["method_state"]["pipeline"]["step"] > 0
    train(config(tmp_path / "cut", method=method, resume=True), dataset=blobs)
    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["train_loss"] for r in cut] == pytest.approx([r["train_loss"] for r in full], rel=1e-6, abs=1e-6)
    wa = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-5, atol=1e-6) for k in wa)


def test_balance_time_profiles_on_cuda(blobs: Dataset) -> None:
    result = train(config(None, method="fr", stages=2, balance="time", epochs=1), dataset=blobs)
    assert sum(result.stage_sizes) > 0 and len(result.stage_sizes) == 2
    assert math.isfinite(result.final["train_loss"])


def test_stages_auto_plans_on_the_gpu_machine(blobs: Dataset) -> None:
    from gradkit.stages.auto import plan_stages
    choice = plan_stages(config(None, method="fr", data="synthetic", model="cnn", limit_train=64, limit_test=32), 2)
    assert choice is not None


def test_measure_direction_on_cuda(blobs: Dataset) -> None:
    bp = train(config(None, method="bp", stages=1, epochs=1, measure_direction=2), dataset=blobs).history
    assert all(abs(r["direction_sigma_min"] - 1) < 1e-4 for r in bp)
    fr = train(config(None, method="fr", stages=2, epochs=1, measure_direction=2), dataset=blobs).history
    assert math.isfinite(fr[0]["direction_sigma_mean"])


def test_bf16_autocast_on_cuda_trains_close_to_fp32(blobs: Dataset) -> None:
    def losses(**kw: object) -> list[float]:
        out: list[float] = []
        train(config(None, **{"method": "bp", "stages": 1, "epochs": 2, **kw}), dataset=blobs,
              on_step=lambda _e, _s, loss: out.append(loss))
        return out

    fp32, bf16 = losses(), losses(precision="bf16")
    assert max(abs(a - b) for a, b in zip(fp32[:10], bf16[:10], strict=True)) <= 0.03
    assert sum(bf16[-4:]) / 4 < 0.5 * bf16[0]
    fr = losses(method="fr", stages=2, precision="bf16", activations="int4")
    assert all(math.isfinite(v) for v in fr)


def test_memory_on_cuda_reports_the_peak_and_finds_the_largest_batch(capsys) -> None:  # noqa: ANN001
    args = ["memory", "--model", "cnn", "--data", "synthetic", "--batch-size", "32", "--device", "cuda",
            "--activations", "exact,int4", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["peak_bytes"] > 0 for r in rows)
    assert main([*args, "--max-batch", "--budget-mb", "64"]) == 0
    found = json.loads(capsys.readouterr().out)
    for r in found:
        assert r["max_batch"] >= 32 and r["peak_bytes"] <= 64 * 2**20
        # The search ended on a batch that did not fit (over budget or out of memory) just above it.
        assert any(b == r["max_batch"] + 1 and peak is None for b, peak in r["tried"]) or r["max_batch"] >= 2**20


def test_max_batch_on_cuda_runs_a_language_model_on_its_token_batches(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over a lazy dog " * 100, encoding="utf-8")
    assert main(["memory", "--model", "gpt", "--model-option", "layers=2", "--model-option", "width=32",
                 "--data", "text", "--data-option", f"path={text}", "--data-option", "context=32",
                 "--batch-size", "8", "--device", "cuda", "--activations", "exact,int2", "--max-batch",
                 "--budget-mb", "32", "--json"]) == 0
    exact, int2 = json.loads(capsys.readouterr().out)
    assert exact["max_batch"] >= 8 and exact["peak_bytes"] <= 32 * 2**20
    assert int2["max_batch"] >= exact["max_batch"]  # fewer bytes kept: at least as large a batch fits
