"""The dataset registry, search roots, the missing-dataset message, and the real development data."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import gradkit.data as gd
from gradkit.data import (
    DATASETS,
    _imagefolder,
    _locate,
    describe_datasets,
    load_dataset,
    search_roots,
)
from gradkit.errors import ConfigError, DataError


def test_registry_names_and_unknown() -> None:
    assert DATASETS.names()[:6] == [
        "fashion-mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "digits",
        "synthetic",
    ]
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet")
    for name in ("fashion-mnist", "cifar10", "digits", "synthetic"):
        assert name in str(info.value)


def test_public_interface() -> None:
    for name in gd.__all__:
        assert hasattr(gd, name), name


def test_search_roots_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADKIT_DATA", str(tmp_path / "env"))
    roots = search_roots(tmp_path / "arg")
    assert roots[0] == tmp_path / "arg"  # data_dir wins over $GRADKIT_DATA
    assert tmp_path / "env" not in roots
    assert roots[1] == tmp_path / "home" / ".cache" / "gradkit"
    assert roots[2] == _locate.SYSTEM_ROOT
    assert roots[-1] == tmp_path.parent / "shared" / "datasets"
    repo_shared = Path(gd.__file__).resolve().parents[3].parent / "shared" / "datasets"
    assert repo_shared in roots
    assert search_roots()[0] == tmp_path / "env"
    assert len({r.resolve() for r in roots}) == len(roots)
    monkeypatch.chdir(
        Path(gd.__file__).resolve().parents[3]
    )  # the repository: cwd-based = repo-based
    assert len(search_roots()) == len({r.resolve() for r in search_roots()})


def test_missing_dataset_one_line_with_places_and_hints(isolated: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", isolated)
    message = str(info.value)
    assert "\n" not in message
    for root in search_roots(isolated):
        assert str(root) in message
    assert (
        "--download" in message and "dataset-fashion-mnist" in message and "--data-dir" in message
    )
    with pytest.raises(DataError, match="--download") as info:
        load_dataset("cifar100", isolated)
    assert "\n" not in str(info.value) and "cifar-100-python" in str(info.value)


def test_describe_datasets(isolated: Path, cifar_batches) -> None:
    cifar_batches(isolated / "cifar-10-batches-py")
    status = {s.name: s for s in describe_datasets(isolated)}
    assert set(status) >= set(DATASETS.names())
    assert (
        status["cifar10"].found == str(isolated / "cifar-10-batches-py")
        and status["cifar10"].available
    )
    assert status["mnist"].found is None and "--download" in status["mnist"].hint
    assert status["mnist"].searched[0] == str(isolated)
    assert status["digits"].found == "scikit-learn" and status["synthetic"].found == "generated"
    assert status["cifar10"].help


def test_digits() -> None:
    ds = load_dataset("digits")
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert ds.info.num_classes == 10 and ds.info.input_shape == (1, 8, 8)
    assert (
        ds.train_x.dtype == torch.float32
        and 0 <= float(ds.train_x.min())
        and float(ds.train_x.max()) <= 1
    )
    assert abs(len(ds.test_y) - 0.2 * 1797) <= 10
    test_share = torch.bincount(ds.test_y) / (
        torch.bincount(ds.test_y) + torch.bincount(ds.train_y)
    )
    assert float(test_share.min()) > 0.18 and float(test_share.max()) < 0.22  # stratified
    again = load_dataset("digits", seed=123)  # the split does not depend on the run's seed
    assert torch.equal(again.test_x, ds.test_x) and torch.equal(again.train_y, ds.train_y)


def test_synthetic_deterministic_and_learnable() -> None:
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.bincount(a.train_y).tolist() == [200] * 10
    # Nearest class mean, fitted on train, already separates the test split.
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(a.test_x.flatten(1), means).argmin(1)
    assert float((pred == a.test_y).float().mean()) > 0.9


def test_limits_are_stratified_and_seeded() -> None:
    ds = load_dataset("synthetic", limit_train=95, limit_test=30, seed=3)
    assert len(ds.train_y) == 95 and len(ds.test_y) == 30
    counts = torch.bincount(ds.train_y, minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [3] * 10
    full = load_dataset("synthetic")
    assert ds.info == full.info  # mean/std of the full train split
    assert torch.equal(load_dataset("synthetic", limit_train=95, seed=3).train_x, ds.train_x)
    assert not torch.equal(load_dataset("synthetic", limit_train=95, seed=4).train_x, ds.train_x)
    assert len(load_dataset("synthetic", limit_train=10**6).train_y) == 2000
    with pytest.raises(ConfigError):
        load_dataset("synthetic", limit_train=0)


# --- the real development copies ------------------------------------------------------------------


def test_fashion_mnist_shared(shared_datasets: Path) -> None:
    if not (shared_datasets / "fashion-mnist").is_dir():
        pytest.skip(f"no fashion-mnist/ in {shared_datasets}")
    ds = load_dataset("fashion-mnist", shared_datasets)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.info.classes[0] == "T-shirt/top" and ds.info.mean[0] == pytest.approx(
        0.2860, abs=1e-3
    )
    assert ds.info.std[0] == pytest.approx(0.3530, abs=1e-3)


@pytest.mark.slow
def test_cifar10_shared_tarball_and_cache(
    shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The development copy (a .tar.gz of 60,000 JPEGs) loads; the second load reads the cache."""
    archive = shared_datasets / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"no {archive}")
    cache = tmp_path_factory.mktemp("decoded")
    monkeypatch.setenv("GRADKIT_CACHE", str(cache))
    ds = load_dataset("cifar10", shared_datasets)
    assert ds.info.source == str(archive)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.info.classes[0] == "airplane" and ds.info.classes[-1] == "truck" and ds.info.augment
    # The README's statistics of this copy.
    for got, want in zip(ds.info.mean, (0.491, 0.482, 0.447), strict=True):
        assert got == pytest.approx(want, abs=2e-3)
    for got, want in zip(ds.info.std, (0.245, 0.243, 0.261), strict=True):
        assert got == pytest.approx(want, abs=2e-3)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the images")

    monkeypatch.setattr(_imagefolder, "decode_images", must_not_decode)
    start = time.perf_counter()
    again = load_dataset("cifar10", shared_datasets, limit_train=1000, limit_test=500)
    assert time.perf_counter() - start < 20  # loose: seconds, not a decode
    assert torch.bincount(again.train_y).tolist() == [100] * 10
    assert again.info == ds.info


def test_digits_read_directly_equal_scikit_learns_loader() -> None:
    # gradkit reads scikit-learn's CSV itself (no 2 s scikit-learn import in every worker process).
    from sklearn.datasets import load_digits as sk_load_digits

    from gradkit.data._registry import _digits_arrays

    images, labels = _digits_arrays()
    bunch = sk_load_digits()
    assert images.shape == (1797, 64) and labels.shape == (1797,)
    assert (images == bunch.data).all() and (labels == bunch.target).all()
