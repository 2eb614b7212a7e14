"""Checkpoints are written atomically and loaded without running code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from gradkit.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from gradkit.errors import DataError


def test_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.arange(5.0), "epoch": 3, "history": [{"a": 1.5}]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 3 and loaded["history"] == [{"a": 1.5}]


def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken(f):  # noqa: ANN001
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)  # torch.save pickles arbitrary objects
    with pytest.raises(DataError, match="not a gradkit checkpoint or is unsafe") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)  # torch's advice would run the payload
    assert not (tmp_path / "PWNED").exists()
    # A raw pickle is refused too.
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"cannot read checkpoint .*c\.pt"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="without --resume"):
        load_checkpoint(tmp_path / "none.pt")
