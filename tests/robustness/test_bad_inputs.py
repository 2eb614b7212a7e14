"""Issue 15 items 5 and 9: bad options, files and checkpoints end in one line naming the problem and
the fix (exit 2), never a traceback, and leave the run folder as it was."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from gradkit.cli import main
from gradkit.errors import DataError

SMALL = ["--model", "mlp", "--data", "digits", "--limit-train", "256", "--limit-test", "64", "--epochs", "1",
         "--threads", "1", "--no-progress"]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``gradkit -q ARGV`` in this process: exit code and its one stderr line (parse errors included)."""
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, one_line(capsys) if code else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but the lock, which holds its last owner's pid."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["-q", "train", *SMALL, "--out", str(out)]) == 0
    return out


# -- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["train", "--method", "dni", "--stages", "2", "-o", "warmup_steps=abc"], "option warmup_steps must be an int"),
    (["train", "--method", "dni", "--stages", "2", "-o", "synthesizer_hidden=-5"], "synthesizer_hidden must be a positive"),
    # --workers: checked in this process before any worker starts, so one line, not one per rank.
    (["train", "--method", "dni", "--stages", "2", "--workers", "2", "-o", "synthesizer_hidden=-5"],
     "synthesizer_hidden must be a positive"),
    (["train", "--device", "foo"], "unknown device 'foo'"),
])
def test_bad_training_options(argv: list[str], expected: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, line = run(capsys, *argv, *SMALL, "--out", str(out))
    assert code == 2 and expected in line
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["schedule", "--method", "dni", "--warmup-steps=-3"], "--warmup-steps: expected an integer >= 0, got -3"),
    (["schedule", "--last-batch", "-3"], "--last-batch: expected an integer >= 0, got -3"),
])
def test_bad_schedule_options(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(capsys, *argv)
    assert code == 2 and expected in line


def test_limit_train_above_the_dataset_or_below_a_batch_is_said(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Decision: a limit above the split's size is allowed (demos fall back to small datasets) but
    named with the size; a train set smaller than one batch is allowed (a smoke run) but said."""
    assert main(["-q", "train", *SMALL, "--limit-train", "100000", "--out", str(tmp_path / "a")]) == 0
    assert one_line(capsys) == "--limit-train 100000 is more than the 1438 examples digits has; using all 1438"
    assert main(["-q", "train", *SMALL, "--limit-train", "1", "--out", str(tmp_path / "b")]) == 0
    assert "fewer than one batch of 128" in one_line(capsys)


# -- plot -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("loss.foo", "has the unknown extension .foo"),
    ("loss", "has no extension"),
    ("config.json/loss.png", "is a file; choose another -o"),
])
def test_plot_bad_output(name: str, expected: str, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(finished_run)
    code, line = run(capsys, "plot", str(finished_run), "-o", str(finished_run / name))
    assert code == 2 and expected in line
    assert snapshot(finished_run) == before


def test_plot_into_a_folder_says_where_it_wrote(finished_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "plot", str(finished_run), "-o", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"plot: {tmp_path / 'loss.png'}"
    assert (tmp_path / "loss.png").is_file()


# -- evaluate ---------------------------------------------------------------------------------------------
def test_evaluate_limit_test_zero_is_refused(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(capsys, "evaluate", "--attack", "fgsm", "--eps", "0.1", "--limit-test", "0", str(finished_run))
    assert code == 2 and "--limit-test: expected a positive integer, got 0" in line


@pytest.mark.parametrize("config", ["[1, 2", "[1]", '{"epochs": "x"}'])
def test_evaluate_malformed_config(config: str, finished_run: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes((finished_run / "model.pt").read_bytes())
    (run_dir / "config.json").write_text(config)
    code, line = run(capsys, "evaluate", "--attack", "fgsm", "--eps", "0.1", str(run_dir))
    assert code == 2 and "config.json" in line


def test_evaluate_weights_of_another_model(finished_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_bytes((finished_run / "config.json").read_bytes())
    torch.save({"conv.weight": torch.zeros(3)}, run_dir / "model.pt")
    code, line = run(capsys, "evaluate", "--attack", "fgsm", "--eps", "0.1", str(run_dir))
    assert code == 2 and "does not hold weights of mlp on digits" in line and "Missing key" in line


# -- checkpoints ------------------------------------------------------------------------------------------
def _forged(finished_run: Path, tmp_path: Path, forge) -> Path:  # noqa: ANN001
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (run_dir / name).write_bytes((finished_run / name).read_bytes())
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    forge(state)
    torch.save(state, run_dir / "checkpoint.pt")
    return run_dir


def _drop_tally(state: dict) -> None:
    del state["tally"]


def _resize_first_weight(state: dict) -> None:
    weights = state["method_state"]["stages"][0]
    weights[next(iter(weights))] = torch.zeros(3, 3)


@pytest.mark.parametrize("forge, expected", [(_drop_tally, "missing entry 'tally'"),
                                             (_resize_first_weight, "size mismatch")])
def test_resume_with_a_forged_checkpoint(forge, expected: str, finished_run: Path, tmp_path: Path,  # noqa: ANN001
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _forged(finished_run, tmp_path, forge)
    before = snapshot(run_dir)
    code, line = run(capsys, "train", *SMALL, "--epochs", "2", "--resume", "--out", str(run_dir))
    assert code == 2 and "checkpoint.pt does not fit this run" in line and expected in line
    assert snapshot(run_dir) == before


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_with_a_malicious_checkpoint_never_suggests_unsafe_loading(
        finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = _forged(finished_run, tmp_path, lambda state: state.update(evil=_Payload()))
    code, line = run(capsys, "train", *SMALL, "--epochs", "2", "--resume", "--out", str(run_dir))
    assert code == 2 and "not a gradkit checkpoint or is unsafe" in line
    assert "weights_only" not in line
    assert not (tmp_path / "PWNED").exists()


def test_compare_never_suggests_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bp").mkdir()
    torch.save({}, tmp_path / "bp" / "checkpoint.pt")
    code, line = run(capsys, "compare", "--methods", "bp", *SMALL, "--out", str(tmp_path))
    assert code == 2 and "already holds compared runs (bp)" in line and "--resume" not in line


# -- data files -------------------------------------------------------------------------------------------
def _ag_news(folder: Path, train: bytes) -> Path:
    folder.mkdir()
    rows = b'"3","Wall St","Stocks rose"\n"1","World","Peace talks"\n'
    (folder / "train.csv").write_bytes(rows + train)
    (folder / "test.csv").write_bytes(rows)
    return folder


@pytest.mark.parametrize("row, expected", [
    (b'"2","Caf\xe9","Sports"\n', "train.csv:3: not UTF-8 (byte 0xe9)"),
    (b'"2","big","' + b"x" * 200_000 + b'"\n', "train.csv:3: not a valid CSV row (field larger than field limit"),
])
def test_ag_news_bad_rows(row: bytes, expected: str, tmp_path: Path) -> None:
    from gradkit.data import load_dataset

    folder = _ag_news(tmp_path / "ag_news_csv", row)
    with pytest.raises(DataError, match=r"\S") as info:
        load_dataset("ag-news", folder)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("pixels", [12_000, 16_000])  # over half of Pillow's limit (a warning), over it (an error)
def test_decompression_bomb_png(pixels: int) -> None:
    from PIL import Image

    from gradkit.data._imagefolder import decode_images

    small = io.BytesIO()
    Image.new("L", (8, 8)).save(small, "PNG")
    # Only the header matters: Pillow checks the size when opening, before decoding any pixel.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", pixels, pixels, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    for blobs in ([bomb], [small.getvalue()] * 3 + [bomb]):
        names = [f"train/0/{i}.png" for i in range(len(blobs))]
        with pytest.raises(DataError, match="too large to decode safely") as info:
            decode_images(blobs, names, "test")
        assert names[-1] in str(info.value)


def test_idx_header_whose_size_wraps_int64(tmp_path: Path) -> None:
    from gradkit.data._idx import read_idx

    path = tmp_path / "bomb-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 4) + bytes(16))
    with pytest.raises(DataError, match="need 18446744073709551616 bytes of data, found 16"):
        read_idx(path)
