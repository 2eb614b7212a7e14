"""--precision bf16: autocast around every method's step; compression of bf16 activations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit import TrainConfig, train
from gradkit import config as config_module
from gradkit.cli import main
from gradkit.compress import Activations
from gradkit.data import Dataset
from gradkit.errors import ConfigError
from gradkit.precision import PRECISIONS, Precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(blobs: Dataset, **kw: object) -> list[float]:
    losses: list[float] = []
    base = dict(method="bp", model="mlp", data="blobs", epochs=2, batch_size=32, lr=0.05, seed=3,
                progress=False, device="cpu")
    base.update(kw)
    train(TrainConfig(**base), dataset=blobs, on_step=lambda _e, _s, loss: losses.append(loss))
    return losses


def test_names_mirror_the_config_and_bad_values_are_one_line_errors(capsys) -> None:  # noqa: ANN001
    assert tuple(PRECISIONS) == config_module.PRECISIONS
    with pytest.raises(ConfigError, match="fp16.*choose one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="fp16"):
        Precision("fp16")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "unused", "--precision", "fp16"])
    assert exc.value.code == 2
    f = lambda: 1  # noqa: E731
    assert Precision("fp32").wrap(f) is f


def test_wrap_runs_under_bf16_autocast() -> None:
    lin = nn.Linear(8, 4)
    out = Precision("bf16", "cpu").wrap(lambda x: lin(x))(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32


def test_bp_bf16_trains_and_its_per_step_loss_is_close_to_fp32(blobs: Dataset) -> None:
    """Tolerance: |loss_bf16 - loss_fp32| <= 0.03 per step over the first 10 steps (bf16 keeps 8 bits
    of mantissa, a relative error of 0.4% per rounding; the trajectories drift apart later)."""
    fp32 = run(blobs)
    bf16 = run(blobs, precision="bf16")
    assert all(math.isfinite(v) for v in bf16)
    assert bf16 != fp32  # autocast really changed the arithmetic
    assert max(abs(a - b) for a, b in zip(fp32[:10], bf16[:10], strict=True)) <= 0.03
    assert sum(bf16[-4:]) / 4 < 0.5 * bf16[0]  # it learns


def test_fr_two_stages_and_int4_run_in_bf16(blobs: Dataset) -> None:
    fr = run(blobs, method="fr", stages=2, balance="count", precision="bf16")
    int4 = run(blobs, activations="int4", precision="bf16")
    for losses in (fr, int4):
        assert all(math.isfinite(v) for v in losses)
        assert sum(losses[-4:]) / 4 < 0.6 * losses[0]


def test_autocast_weight_copies_are_not_compressed() -> None:
    """Under bf16 autocast a Linear saves a bf16 cast copy of its weight: a new tensor, not a parameter.
    The compressor keeps it (its ToCopyBackward0 leads to a parameter): compressing it would free
    nothing the step needs (autocast holds the copy for the step anyway) and would put quantisation
    error into the weight itself. The activations, bf16, are packed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40))
    x, y = torch.randn(32, 64), torch.randint(0, 40, (32,))
    act = Activations(model, "int4")
    with torch.autocast("cpu", dtype=torch.bfloat16), act, act.recording() as records:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    act.close()
    assert loss.dtype == torch.float32  # cross_entropy runs in fp32 under autocast
    packed = [r for r in records if r.kind == "int4"]
    assert packed and all(r.dtype == torch.bfloat16 for r in packed)
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    assert not any(r.shape in weight_shapes for r in records)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_memory_bf16_reports_its_ratio_against_bf16_exact(capsys) -> None:  # noqa: ANN001
    out = {}
    for precision in ("fp32", "bf16"):
        assert main(["memory", "--model", "cnn", "--data", "synthetic", "--batch-size", "32", "--threads", "1",
                     "--activations", "int4", "--precision", precision, "--json"]) == 0
        out[precision] = json.loads(capsys.readouterr().out)
    bf16, fp32 = out["bf16"], out["fp32"]
    assert bf16["precision"] == "bf16"
    # Exact bf16 activations are 2 bytes an element (the fp32 input batch excepted): about half.
    assert 0.45 * fp32["exact_bytes"] < bf16["exact_bytes"] < 0.6 * fp32["exact_bytes"]
    assert bf16["ratio"] == pytest.approx(bf16["exact_bytes"] / bf16["stored_bytes"], rel=1e-3)
    assert bf16["ratio"] < fp32["ratio"]  # 4 bits against 16, not against 32
