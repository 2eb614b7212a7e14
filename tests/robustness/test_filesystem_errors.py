"""Issue 15 item 4: --out on a file, read-only folders and full disks end in one line (exit 2), never a
traceback, and leave the run folder as it was (the last good checkpoint stays loadable)."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradkit._fileio import check_writable_folder
from gradkit.checkpoint import load_checkpoint
from gradkit.cli import main
from gradkit.errors import StorageError
from gradkit.run_folder import RunFolder

SMALL = ["--model", "mlp", "--data", "digits", "--limit-train", "256", "--limit-test", "64", "--epochs", "1",
         "--threads", "1", "--no-progress"]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def train(capsys: pytest.CaptureFixture[str], out: Path, *extra: str) -> tuple[int, str]:
    code = main(["-q", "train", *SMALL, "--out", str(out), *extra])
    return code, one_line(capsys) if code else ""


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """An empty folder to mount over; unmounted afterwards."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", str(point)], capture_output=True)


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, line = train(capsys, target)
    assert code == 2 and "is a file" in line and "--out" in line
    assert target.read_text() == "keep me"


def test_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    code, line = train(capsys, tmp_path / "notes.txt" / "run")
    assert code == 2 and "which is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_read_only_out_is_found_by_a_probe_file(mount_point: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Root ignores permission bits (chmod 0555), so the check writes a probe file; a read-only bind
    mount refuses root too, which is what this covers."""
    source = tmp_path / "source"
    source.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(mount_point)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(mount_point)], capture_output=True)
    if ro.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {ro.stderr.decode().strip()}")
    code, line = train(capsys, mount_point / "run")
    assert code == 2 and "not writable" in line and "Read-only" in line
    assert list(mount_point.iterdir()) == []


def test_out_is_checked_before_data_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before --out was checked")

    monkeypatch.setattr("gradkit.backend.load_dataset", no_loading)
    (tmp_path / "f").write_text("")
    code, line = train(capsys, tmp_path / "f")
    assert code == 2 and "is a file" in line


def test_check_writable_folder_creates_it_and_leaves_no_probe(tmp_path: Path) -> None:
    folder = check_writable_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="which is a file"):
        check_writable_folder(tmp_path / "file" / "run")


@pytest.mark.parametrize("failure", ["enospc", "torch-zip"])
def test_disk_full_keeps_the_last_good_checkpoint(failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The second epoch's checkpoint hits a full disk while its bytes are written: plain writes report
    ENOSPC, torch.save's zip writer ``RuntimeError: [enforce fail at inline_container.cc:672]
    unexpected pos``. The first checkpoint, verified, stays."""
    import gradkit.run_folder as run_folder

    real_write = run_folder.atomic_write
    checkpoints = []

    def atomic_write(path: object, write: object) -> Path:
        if Path(str(path)).name == "checkpoint.pt":
            checkpoints.append(path)
            if len(checkpoints) == 2:
                def fail(f: object) -> None:
                    if failure == "enospc":
                        raise OSError(errno.ENOSPC, "No space left on device")
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

                return real_write(path, fail)  # type: ignore[arg-type]
        return real_write(path, write)  # type: ignore[arg-type]

    monkeypatch.setattr(run_folder, "atomic_write", atomic_write)
    out = tmp_path / "run"
    code, line = train(capsys, out, "--epochs", "2")
    assert code == 2
    assert line.startswith("gradkit train: error: no space left on device writing ")
    assert "checkpoint.pt" in line and "is kept" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert RunFolder(out).load_checkpoint()["epoch"] == 1  # and its digest verifies
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_disk_full_on_a_tiny_tmpfs(mount_point: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real full disk: 64 kB hold config.json but not the first checkpoint."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    code, line = train(capsys, mount_point / "run")
    assert code == 2 and "no space left on device writing" in line and "checkpoint.pt" in line
    assert not any(p.name.endswith(".tmp") for p in (mount_point / "run").iterdir())
