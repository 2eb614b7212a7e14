"""A model and data of the user's own (``user_model.py`` beside this test, outside gradkit) wherever a
registered name works: the CLI, ``--workers``, ``--resume``, ``TrainConfig(model=callable)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import user_model
from torch import nn

import gradkit
from gradkit.cli import main
from gradkit.data import load_dataset
from gradkit.errors import ConfigError
from gradkit.models import build_model

TRAIN = ["train", "--model", "user_model:build", "--data", "user_model:blobs", "--model-option", "hidden=16",
         "--method", "bp", "--stages", "2", "--batch-size", "32", "--threads", "1", "--no-progress",
         "--lr-schedule", "constant"]  # constant: a run cut at --epochs 1 then resumed equals a 2-epoch run


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_factory_module_trains_from_the_cli_with_workers_and_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    assert _cli(capsys, *TRAIN, "--epochs", "2", "--out", str(one))[0] == 0
    losses = _losses(one)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert json.loads((one / "config.json").read_text())["model"] == "user_model:build"

    assert _cli(capsys, *TRAIN, "--epochs", "2", "--workers", "2", "--out", str(two))[0] == 0
    assert _losses(two) == losses
    _assert_same_weights(one, two)

    assert _cli(capsys, *TRAIN, "--epochs", "1", "--out", str(cut))[0] == 0
    assert _cli(capsys, *TRAIN, "--epochs", "2", "--resume", "--out", str(cut))[0] == 0
    assert _losses(cut) == losses
    _assert_same_weights(one, cut)


def test_a_top_level_callable_is_stored_as_its_import_path(tmp_path: Path) -> None:
    config = gradkit.TrainConfig(model=user_model.build, data=user_model.blobs, epochs=1, progress=False)
    assert (config.model, config.data) == ("user_model:build", "user_model:blobs")
    result = gradkit.train(config)
    assert result.final["test_acc"] > 0.5  # four blobs, chance 0.25


def test_a_local_callable_trains_here_but_cannot_travel(tmp_path: Path) -> None:
    def local(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        return user_model.build(input_shape, num_classes, hidden=8)

    result = gradkit.train(gradkit.TrainConfig(model=local, data="user_model:blobs", epochs=1, progress=False,
                                               out=str(tmp_path / "run")))
    assert len(result.history) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"].startswith("<callable ")
    with pytest.raises(ConfigError, match="module:factory"):
        gradkit.TrainConfig(model=local, data="user_model:blobs", workers=2, stages=2, out=str(tmp_path / "w"))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("user_model:missing", "has no attribute 'missing'"),
        ("user_model:NOT_CALLABLE", "is a int, not a callable"),
        ("user_model:not_sequential", "wrap your model's layers in nn.Sequential"),
        ("user_model:", "must look like package.module:function"),
    ],
)
def test_a_broken_factory_is_one_line_that_names_it(model: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_model(model, (1, 4, 4), 4)
    assert "\n" not in str(info.value) and model.rstrip(":") in str(info.value)


def test_a_broken_factory_exits_2_on_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _cli(capsys, "train", "--model", "user_model:missing", "--out", str(tmp_path / "x"))
    assert code == 2 and "user_model:missing" in err and len(err.strip().splitlines()) == 1


def test_data_functions_get_their_options_and_must_return_a_dataset() -> None:
    assert load_dataset("user_model:blobs", options={"classes": 3}).info.num_classes == 3
    with pytest.raises(ConfigError, match="unknown option.*accepts: classes"):
        load_dataset("user_model:blobs", options={"colour": 1})
    with pytest.raises(ConfigError, match="not a gradkit.data.Dataset"):
        load_dataset(lambda: user_model.build((4,), 2))  # type: ignore[arg-type, return-value]
