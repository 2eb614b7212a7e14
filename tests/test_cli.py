"""The command line: exit codes, one-line errors, and the issue's acceptance runs on small data."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradkit.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    return lines[0]


def test_unknown_dataset_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--data", "nosuch", "--epochs", "1", "--out", str(tmp_path / "d"))
    assert code == 2
    line = one_line(err)
    assert "nosuch" in line and "fashion-mnist" in line  # names the bad value and the choices


class _WriteRecorder:
    """A stderr that keeps each ``write`` call apart, as a pipe shared by several processes sees them."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_error_line_reaches_stderr_in_one_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Worker processes of --workers share the launcher's stderr. print() writes the text and the
    # newline in two calls, and two ranks failing together once ran their lines into one.
    recorder = _WriteRecorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    code = main(["train", "--data", "nosuch", "--epochs", "1", "--out", str(tmp_path / "d")])
    assert code == 2
    errors = [text for text in recorder.writes if "error" in text]
    assert len(errors) == 1 and errors[0].endswith("\n") and errors[0].count("\n") == 1, recorder.writes
    assert "nosuch" in errors[0]


def test_corrupt_data_file_exits_2_naming_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    header = (2051).to_bytes(4, "big") + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + bytes(1000)))  # far too short
    for name, n in (("train-labels-idx1-ubyte", 60000), ("t10k-labels-idx1-ubyte", 10000)):
        (folder / f"{name}.gz").write_bytes(
            gzip.compress((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))
        )
    code, _, err = run_cli(capsys, "train", "--model", "mlp", "--data", "fashion-mnist", "--data-dir",
                           str(tmp_path / "data"), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2
    assert "images-idx3-ubyte" in one_line(err)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--epochs", "1"], "--out"),
        (["train", "--out", "x", "--lr", "nan"], "--lr"),
        (["train", "--out", "x", "--epochs", "0"], "--epochs"),
        (["train", "--out", "x", "--method", "nosuch"], "nosuch"),
        (["compare", "--methods", "bp,nosuch"], "nosuch"),
        (["plot", "/nonexistent/run"], "not a gradkit run folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --out that gets created lands here, not in the checkout
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in one_line(err)


def test_mlp_on_digits_reaches_95_percent(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "D"
    code, stdout, err = run_cli(capsys, "train", "--method", "bp", "--model", "mlp", "--data", "digits",
                                "--epochs", "5", "--no-progress", "--out", str(out))
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5
    assert records[-1]["test_acc"] >= 0.95
    assert "test_acc" in stdout


def test_compare_prints_table_and_writes_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stdout, err = run_cli(capsys, "compare", "--model", "mlp", "--data", "digits", "--epochs", "2",
                                "--no-progress", "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert "method" in stdout and "activation memory" in stdout and "bp" in stdout
    png = tmp_path / "cmp" / "compare.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in stdout
    code, stdout, _ = run_cli(capsys, "plot", str(tmp_path / "cmp" / "bp"), "-o", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").is_file()


def test_compare_falls_back_when_data_is_nowhere(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # MNIST is not among the development copies; an empty home makes sure no cached copy is found.
    monkeypatch.setenv("HOME", str(tmp_path))
    code, stdout, err = run_cli(capsys, "compare", "--model", "mlp", "--data", "mnist", "--fallback-data",
                                "digits", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert "mnist was not found" in err and "using digits instead" in err
    assert "digits" in stdout


def test_datasets_and_env_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "datasets")
    assert code == 0
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic"):
        assert name in out
    code, out, _ = run_cli(capsys, "env", "--json")
    assert code == 0 and "torch" in json.loads(out)["packages"]


def test_python_dash_m_gradkit_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "gradkit", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "--resume" in proc.stdout and "--limit-train" in proc.stdout


@pytest.mark.acceptance
def test_cnn_on_fashion_mnist_reaches_88_percent_in_3_epochs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_datasets: Path
) -> None:
    """The foundation issue's acceptance command as written (0.911 measured): about 150 s on 2 cores,
    a quarter of the suite's budget, so it runs with `make acceptance`; the next test runs the same
    command on a quarter of the training set in every `make test`."""
    records = _cnn_on_fashion_mnist_for_3_epochs(capsys, tmp_path)
    assert records[-1]["test_acc"] >= 0.88


@pytest.mark.slow
def test_cnn_on_a_quarter_of_fashion_mnist_reaches_87_percent_in_3_epochs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_datasets: Path
) -> None:
    # The same defaults (SGD, cosine schedule, batch 128) on 15,000 training images, tested on all
    # 10,000: 0.885 measured on the 2-core machine (the full command above: 0.911).
    records = _cnn_on_fashion_mnist_for_3_epochs(capsys, tmp_path, "--limit-train", "15000")
    assert records[-1]["samples"] == 15000
    assert records[-1]["test_acc"] >= 0.87


def _cnn_on_fashion_mnist_for_3_epochs(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       *extra: str) -> list[dict]:
    """``gradkit train --method bp --model cnn --data fashion-mnist --epochs 3 [extra]``: its metrics."""
    out = tmp_path / "D"
    code, _, err = run_cli(capsys, "train", "--method", "bp", "--model", "cnn", "--data", "fashion-mnist",
                           "--epochs", "3", *extra, "--no-progress", "--out", str(out))
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    return records


@pytest.mark.slow
def test_resnet20_runs_on_the_development_copy_of_cifar10(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_datasets: Path
) -> None:
    out = tmp_path / "D"
    code, _, err = run_cli(capsys, "train", "--method", "bp", "--model", "resnet20", "--data", "cifar10",
                           "--limit-train", "5000", "--limit-test", "1000", "--epochs", "1", "--no-progress",
                           "--out", str(out))
    assert code == 0, err
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["test_acc"] > 0.15  # one epoch on 5,000 images: clearly above chance (0.10)
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["limit_train"]) == ("resnet20", 5000)


def test_method_option_flag_parses_values_and_rejects_unknown_keys(capsys):
    from gradkit.cli._parser import _method_option

    assert _method_option("bn_policy=reference") == ("bn_policy", "reference")
    assert _method_option("double-first-lr=true") == ("double_first_lr", True)
    assert _method_option("copies=8") == ("copies", 8)
    assert _method_option("sigma=0.5") == ("sigma", 0.5)
    code = main(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "1",
                 "--out", "/tmp/gradkit-never-written", "-o", "nosuch=1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gradkit train: error: method 'bp' does not take option 'nosuch'")


def test_warmup_steps_reaches_the_config() -> None:
    import argparse

    from gradkit.cli._parser import add_training_args, config_from_args
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    assert config_from_args(parser.parse_args(["--warmup-steps", "50"])).warmup_steps == 50
    assert config_from_args(parser.parse_args([])).warmup_steps == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup-steps", "-1"])
