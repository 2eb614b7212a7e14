"""CIFAR: official pickled batches (folder and .tar.gz), refusal of unsafe pickles, image trees, cache."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gradkit.data import _imagefolder, load_dataset
from gradkit.data._cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from gradkit.data._imagefolder import class_order, tree_from_members
from gradkit.data._safe_pickle import safe_loads
from gradkit.errors import DataError

PIL = pytest.importorskip("PIL.Image")


def make_tar(archive: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return archive


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_batches_folder(isolated: Path, protocol: int, cifar_batches) -> None:
    written = cifar_batches(isolated / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset("cifar10", isolated)
    assert ds.info.input_shape == (3, 32, 32) and ds.info.augment
    assert ds.info.classes == tuple(f"class_{i}" for i in range(10))  # from batches.meta
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (50, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_x.numpy(), written["train"][0])
    np.testing.assert_array_equal(ds.train_y.numpy(), written["train"][1])
    np.testing.assert_array_equal(ds.test_x.numpy(), written["test"][0])
    np.testing.assert_array_equal(ds.test_y.numpy(), written["test"][1])
    expected = written["train"][0].transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(ds.info.mean, expected.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(ds.info.std, expected.std(axis=1), atol=1e-5)


def test_official_tarball_read_without_extracting(
    isolated: Path, tmp_path: Path, cifar_batches
) -> None:
    written = cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
    make_tar(
        isolated / "cifar-10-python.tar.gz",
        tmp_path / "src" / "cifar-10-batches-py",
        "cifar-10-batches-py",
    )
    ds = load_dataset("cifar10", isolated)
    assert ds.info.source == str(isolated / "cifar-10-python.tar.gz")
    np.testing.assert_array_equal(ds.test_x.numpy(), written["test"][0])
    assert sorted(p.name for p in isolated.iterdir()) == [
        "cifar-10-python.tar.gz"
    ]  # nothing extracted


def test_cifar100_fine_labels(isolated: Path, cifar_batches) -> None:
    written = cifar_batches(isolated / "cifar-100-python", name="cifar100")
    ds = load_dataset("cifar100", isolated)
    assert ds.info.num_classes == 100 and len(ds.train_y) == 200
    np.testing.assert_array_equal(ds.train_y.numpy(), written["train"][1])
    assert int(ds.train_y.max()) == 99  # fine, not coarse, labels


def test_truncated_tarball_is_a_data_error(isolated: Path, tmp_path: Path, cifar_batches) -> None:
    cifar_batches(tmp_path / "src")
    archive = make_tar(tmp_path / "full.tar.gz", tmp_path / "src", "cifar-10-batches-py")
    cut = isolated / "cifar-10-python.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_dataset("cifar10", isolated)
    assert str(cut) in str(info.value)


def test_batch_with_wrong_shape(isolated: Path, cifar_batches) -> None:
    folder = isolated / "cifar-10-batches-py"
    cifar_batches(folder)
    bad = {b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(
        DataError, match=r"data_batch_3: 'data' must be a uint8 array of shape \(N, 3072\)"
    ):
        load_dataset("cifar10", isolated)


class Evil:
    """Runs a shell command when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_batch_refused_and_nothing_runs(
    isolated: Path, tmp_path: Path, cifar_batches
) -> None:
    folder = isolated / "cifar-10-batches-py"
    cifar_batches(folder)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((10, 3072), np.uint8), b"labels": Evil(marker)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", isolated)
    message = str(info.value)
    assert message.startswith(
        f"refusing to load {folder / 'data_batch_2'}: it asks to import os.system;"
    )
    assert "only plain data (arrays, lists, dicts, strings, numbers) is allowed" in message
    assert not marker.exists()
    # The gadget is real: a plain unpickler runs it.
    pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        (eval, ("1+1",)),
        (exec, ("import os",)),
        (subprocess.Popen, (["true"],)),
        (__import__, ("subprocess",)),
        (np.load, ("x.npy",)),
    ],
    ids=["eval", "exec", "popen", "import", "numpy-load"],
)
def test_safe_loads_refuses_other_callables(payload) -> None:
    class Gadget:
        def __reduce__(self):
            return payload

    with pytest.raises(DataError, match="refusing to load src: it asks to import"):
        safe_loads(pickle.dumps([1, Gadget()], protocol=2), "src")


def test_safe_loads_plain_data() -> None:
    value = {
        b"a": [1, 2.5, "s", b"b", None, True],
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    for protocol in range(0, 6):
        got = safe_loads(pickle.dumps(value, protocol=protocol), "x")
        np.testing.assert_array_equal(got["arr"], value["arr"])
        assert got[b"a"] == value[b"a"]


def test_corrupt_pickle_is_a_data_error() -> None:
    data = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8)}, protocol=2)
    with pytest.raises(DataError, match="x is truncated or corrupt"):
        safe_loads(data[: len(data) // 2], "x")


# --- image-folder trees ---------------------------------------------------------------------------


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_tree(
    root: Path, classes=CIFAR10_CLASSES, per_class=(2, 1), fmt: str = "PNG", seed: int = 0
):
    """``root/{train,test}/<class>/NNNN.png`` with random 32x32 RGB images; returns {relpath: array}."""
    rng = np.random.default_rng(seed)
    images = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
                (root / rel).write_bytes(png_bytes(array, fmt))
                images[rel] = array
    return images


def check_tree(ds, images: dict[str, np.ndarray]) -> None:
    assert ds.info.classes == CIFAR10_CLASSES
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        rels = sorted(r for r in images if r.startswith(split + "/"))
        assert len(x) == len(rels)
        for row, rel in enumerate(rels):
            cls = rel.split("/")[1]
            assert int(y[row]) == CIFAR10_CLASSES.index(cls)
            np.testing.assert_array_equal(x[row].permute(1, 2, 0).numpy(), images[rel])


@pytest.mark.parametrize("layout", ["cifar10", "cifar10/cifar10"])
def test_image_tree_folder(isolated: Path, layout: str) -> None:
    images = write_tree(isolated / layout)
    ds = load_dataset("cifar10", isolated)
    check_tree(ds, images)
    assert ds.info.source == str(isolated / layout)


def test_image_tree_targz_and_cache(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = write_tree(tmp_path / "src" / "cifar10")
    make_tar(isolated / "cifar10-jpeg.tar.gz", tmp_path / "src" / "cifar10", "cifar10")
    cache = Path(os.environ["GRADKIT_CACHE"])
    ds = load_dataset("cifar10", isolated)
    check_tree(ds, images)
    entries = list(cache.glob("cifar10-*.npz"))
    assert len(entries) == 1 and not list(cache.glob("*.tmp"))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the images")

    monkeypatch.setattr(_imagefolder, "decode_images", must_not_decode)
    again = load_dataset("cifar10", isolated)
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    assert again.info == ds.info


def test_plain_tar_without_top_folder(isolated: Path, tmp_path: Path) -> None:
    images = write_tree(tmp_path / "src", per_class=(1, 1))
    with tarfile.open(isolated / "cifar10.tar", "w") as tf:
        for split in ("train", "test"):
            tf.add(tmp_path / "src" / split, arcname=split)
    check_tree(load_dataset("cifar10", isolated), images)


def test_archive_without_data_is_named(isolated: Path, tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    make_tar(isolated / "cifar10.tar.gz", tmp_path / "junk", "junk")
    with pytest.raises(DataError, match="holds neither the official cifar10 batches") as info:
        load_dataset("cifar10", isolated)
    assert str(isolated / "cifar10.tar.gz") in str(info.value)
    (isolated / "cifar10.tar.gz").write_bytes(b"not a tar at all")
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("cifar10", isolated)


def test_changed_folder_is_decoded_again(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "cifar10"
    write_tree(root)
    load_dataset("cifar10", isolated)
    changed = np.zeros((32, 32, 3), np.uint8)
    (root / "test" / "cat" / "0000.png").write_bytes(png_bytes(changed))
    os.utime(
        root / "test" / "cat" / "0000.png", ns=(1, 1)
    )  # a different mtime even on coarse clocks
    ds = load_dataset("cifar10", isolated)
    row = sorted(r for r in images_in(root) if r.startswith("test/")).index("test/cat/0000.png")
    assert int(ds.test_x[row].sum()) == 0


def images_in(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*.png")]


def test_unwritable_cache_warns_and_loads(
    isolated: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    write_tree(isolated / "cifar10", per_class=(1, 1))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GRADKIT_CACHE", str(blocker / "cache"))
    with caplog.at_level("WARNING"):
        ds = load_dataset("cifar10", isolated)
    assert len(ds.train_y) == 10
    assert any("cannot write the decoded-image cache" in r.message for r in caplog.records)


def test_jpeg_tree(isolated: Path) -> None:
    images = write_tree(isolated / "cifar10", per_class=(1, 1), fmt="JPEG")
    ds = load_dataset("cifar10", isolated)
    rels = sorted(r for r in images if r.startswith("train/"))
    diff = np.abs(
        ds.train_x.permute(0, 2, 3, 1).numpy().astype(int) - np.stack([images[r] for r in rels])
    )
    assert diff.mean() < 60  # lossy, but the same images (random noise compresses badly)


def test_corrupt_image_named(isolated: Path) -> None:
    write_tree(isolated / "cifar10", per_class=(1, 1))
    bad = isolated / "cifar10" / "train" / "dog" / "0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode image") as info:
        load_dataset("cifar10", isolated)
    assert "train/dog/0000.png" in str(info.value)


def test_image_of_another_size_named(isolated: Path) -> None:
    write_tree(isolated / "cifar10", per_class=(1, 1))
    odd = isolated / "cifar10" / "test" / "ship" / "0000.png"
    odd.write_bytes(png_bytes(np.zeros((16, 32, 3), np.uint8)))
    with pytest.raises(DataError, match="all images must have one size") as info:
        load_dataset("cifar10", isolated)
    assert "test/ship/0000.png" in str(info.value)


def test_missing_pillow_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DataError, match="pip install Pillow"):
        _imagefolder.decode_images([b"x"], ["f.jpg"], "test")


def test_class_order_known_list_or_sorted() -> None:
    assert class_order({"b", "a", "c"}, ("c", "a", "b")) == ("c", "a", "b")
    assert class_order({"b", "a", "d"}, ("c", "a", "b")) == ("a", "b", "d")
    assert class_order(set(CIFAR100_CLASSES), CIFAR100_CLASSES) == CIFAR100_CLASSES
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))


def test_tree_members_sorted_classes_and_grey(tmp_path: Path) -> None:
    grey = [np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 40)]
    members = [
        ("top/train/zebra/a.png", png_bytes(grey[0])),
        ("top/train/ant/b.png", png_bytes(grey[1])),
        ("top/test/ant/c.png", png_bytes(grey[2])),
        ("top/test/._c.png", b"resource fork"),  # ignored: hidden file
        ("top/README", b"ignored"),
        ("top/train/zebra/d.png", png_bytes(grey[3])),
    ]
    tree = tree_from_members(members, "mem", "test")
    assert tree.classes == ("ant", "zebra")
    assert tree.train_x.shape == (3, 1, 4, 5)
    assert tree.train_x[:, 0, 0, 0].tolist() == [
        20,
        10,
        40,
    ]  # sorted by path: ant/b, zebra/a, zebra/d
    assert tree.train_y.tolist() == [0, 1, 1] and tree.test_y.tolist() == [0]


def test_tree_errors() -> None:
    img = png_bytes(np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="several image trees"):
        tree_from_members([("a/train/x/1.png", img), ("b/test/x/1.png", img)], "mem", "t")
    with pytest.raises(DataError, match="no test/<class>/ images"):
        tree_from_members([("train/x/1.png", img)], "mem", "t")
    with pytest.raises(DataError, match=r"test classes \['y'\] have no train images"):
        tree_from_members([("train/x/1.png", img), ("test/y/1.png", img)], "mem", "t")
    with pytest.raises(DataError, match="holds no images"):
        tree_from_members([("readme.txt", b"")], "mem", "t")
