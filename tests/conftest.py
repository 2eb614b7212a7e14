"""Shared fixtures: a small learnable dataset, the shared development data, isolated caches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradkit.data import Dataset, DatasetInfo

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests off the user's data settings; the decoded-image cache is shared by the session."""
    monkeypatch.delenv("GRADKIT_DATA", raising=False)
    monkeypatch.delenv("GRADKIT_MIRROR", raising=False)
    if "GRADKIT_CACHE" not in os.environ:
        monkeypatch.setenv("GRADKIT_CACHE", str(Path.home() / ".cache" / "gradkit" / "decoded"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"development datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


def make_blobs(n_train: int = 384, n_test: int = 192, classes: int = 4, seed: int = 0) -> Dataset:
    """Gaussian blobs as 1x4x4 'images' in [0, 1]: learnable in a few epochs, fast to train."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(classes, 16, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        x = centers[y] + 0.08 * torch.randn(n, 16, generator=g)
        return x.clamp(0, 1).reshape(n, 1, 4, 4).float(), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    info = DatasetInfo(
        name="blobs",
        input_shape=(1, 4, 4),
        num_classes=classes,
        classes=tuple(str(c) for c in range(classes)),
        mean=(0.5,),
        std=(0.3,),
        augment=False,
        source="generated",
    )
    return Dataset(info, train_x, train_y, test_x, test_y)


@pytest.fixture
def blobs() -> Dataset:
    return make_blobs()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: suites of many tiny tensor ops otherwise lose most of their time
    to OpenMP spin-waits on a busy 2-core machine (24 ms per tiny Linear call with 2 threads under load,
    0.02 ms with 1). Folders of such tests use it through an autouse fixture in their conftest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available (``make gpu-check`` runs them); tests
    marked ``acceptance`` only when selected with ``-m acceptance`` (``make acceptance``)."""
    if "acceptance" not in (config.getoption("markexpr") or ""):
        later = pytest.mark.skip(reason="full-size acceptance run: make acceptance")
        for item in items:
            if item.get_closest_marker("acceptance") is not None:
                item.add_marker(later)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
