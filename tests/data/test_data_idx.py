"""IDX files: exact round trips, and one-line errors that name the file for every kind of damage."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gradkit.data import load_dataset
from gradkit.data._idx import read_idx
from gradkit.errors import DataError

CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written independently of the reader."""
    header = struct.pack(">BBBB", 0, 0, CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    data = idx_bytes(array)
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, -1, 7], dtype=np.int8),
        np.array([[1, -300], [70000, -5]], dtype=np.int32),
        np.array([0.5, -2.25, 1e6], dtype=np.float32),
        np.array([[1.5], [-1e-300]], dtype=np.float64),
        np.array([-2, 512], dtype=np.int16),
    ],
    ids=["u8-3d", "i8", "i32", "f32", "f64", "i16"],
)
def test_round_trip_exact(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path / ("f.gz" if gz else "f"), array)
    got = read_idx(path)
    assert got.dtype == array.dtype.newbyteorder("=")
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    got[...] = 0  # writable, so torch.from_numpy does not warn


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels-without-suffix", array, gz=True)
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data_names_file(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((5, 4, 4), dtype=np.uint8))[:-7]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "80 bytes" in str(info.value) and "73" in str(info.value)


def test_trailing_garbage_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"xx")
    with pytest.raises(DataError, match="longer than its header says"):
        read_idx(path)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\x00\x00\x08", "truncated"),  # shorter than the magic number
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),  # header cut inside the dimensions
        (b"\x00\x01\x08\x01\x00\x00\x00\x01x", "not an IDX file"),  # bad zero bytes
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "not an IDX file"),  # unknown type code
        (b"\x00\x00\x08\x00", "not an IDX file"),  # zero dimensions
        (b"PK\x03\x04 this is a zip", "not an IDX file"),
    ],
)
def test_bad_headers(tmp_path: Path, content: bytes, what: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=what) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip_stream(tmp_path: Path) -> None:
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32))))
    compressed[20:40] = b"\xff" * 20
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match="corrupt|truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")


def write_mnist_like(
    folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True, dotted: bool = False
):
    """The four IDX files of an MNIST-style dataset with tiny splits; returns the arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("layout", ["mnist", "MNIST/raw", "."])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_folder(isolated: Path, layout: str, gz: bool) -> None:
    arrays = write_mnist_like(isolated / layout, gz=gz, dotted=(layout == "."))
    ds = load_dataset("mnist", isolated)
    assert ds.info.input_shape == (1, 28, 28) and ds.info.num_classes == 10 and not ds.info.augment
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_y.dtype.is_floating_point is False and str(ds.train_y.dtype) == "torch.int64"
    expected_mean = arrays["train-images-idx3-ubyte"].mean() / 255
    assert ds.info.mean[0] == pytest.approx(expected_mean, abs=1e-5)
    assert ds.info.std[0] == pytest.approx(arrays["train-images-idx3-ubyte"].std() / 255, abs=1e-5)


def test_fashion_mnist_truncated_file_named(isolated: Path) -> None:
    folder = isolated / "fashion-mnist"
    write_mnist_like(folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes((np.arange(30) % 10).astype(np.uint8))[:-3]))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", isolated)
    assert str(labels) in str(info.value) and "truncated" in str(info.value)


def test_labels_images_mismatch(isolated: Path) -> None:
    folder = isolated / "mnist"
    write_mnist_like(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    with pytest.raises(DataError, match="9 labels for 10 images"):
        load_dataset("mnist", isolated)
