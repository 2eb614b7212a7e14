"""Fixtures for the data tests: an environment where only the tests' own folders hold datasets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from gradkit.data import _locate


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No dataset can be found except under the returned folder (passed as ``data_dir``).

    HOME, the working directory, the system root and the repository's shared folder all point at
    empty temporary folders; decoded images are cached in a fresh temporary folder.
    """
    home = tmp_path / "home"
    work = tmp_path / "cwd" / "repo"
    for d in (home, work):
        d.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setattr(_locate, "SYSTEM_ROOT", tmp_path / "usr-share-datasets")
    monkeypatch.setattr(_locate, "_repo_shared", lambda: None)
    monkeypatch.setenv("GRADKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADKIT_DATA", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    return data


@pytest.fixture
def cifar_batches():
    """The function :func:`write_cifar_batches`, for tests to call."""
    return write_cifar_batches


def write_cifar_batches(
    folder: Path, name: str = "cifar10", per_batch: int = 10, protocol: int = 2, seed: int = 0
):
    """Write a tiny dataset in the official CIFAR "python version" layout; returns the arrays written.

    Dicts have bytes keys as the official Python 2 pickles do (``b"data"``, ``b"labels"``).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        train, test, meta, label_key, names_key, k = (
            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names", 10,
        )  # fmt: skip
    else:
        train, test, meta, label_key, names_key, k = (
            ["train"],
            ["test"],
            "meta",
            b"fine_labels",
            b"fine_label_names",
            100,
        )
    out = {}
    for split, files in (("train", train), ("test", test)):
        xs, ys = [], []
        for f in files:
            n = per_batch if name == "cifar10" else 2 * k
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [int(v) for v in np.arange(n) % k]
            batch = {
                b"batch_label": f.encode(),
                label_key: labels,
                b"data": data,
                b"filenames": [b"x.png"] * n,
            }
            if name == "cifar100":
                batch[b"coarse_labels"] = [v // 5 for v in labels]
            (folder / f).write_bytes(pickle.dumps(batch, protocol=protocol))
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.array(labels))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    names = [f"class_{i}".encode() for i in range(k)]
    (folder / meta).write_bytes(
        pickle.dumps({names_key: names, b"num_cases_per_batch": per_batch}, protocol=protocol)
    )
    return out
