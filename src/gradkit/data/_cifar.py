"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Accepted layouts: the official "python version" (a folder of pickled batches, or the ``.tar.gz`` it ships
as, read without extracting), or an image-folder tree (a folder or a tar of ``train/<class>/*.jpg``).
Pickles go through :class:`~gradkit.data._safe_pickle.SafeUnpickler`; decoded image trees are cached.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from gradkit.data import _cache
from gradkit.data._imagefolder import (
    ImageTree,
    image_member,
    list_tree_dir,
    read_tar,
    read_tree_dir,
    tree_from_members,
)
from gradkit.data._locate import Found
from gradkit.data._safe_pickle import safe_loads
from gradkit.errors import DataError

__all__ = ["CIFAR10_CLASSES", "CIFAR100_CLASSES", "BATCH_FILES", "load_cifar"]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# The official meta file's fine-label order (alphabetical).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# Per dataset: train batch files, test batch files, meta file, label key, class-names key.
BATCH_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, str, str]] = {
    "cifar10": (
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}
KNOWN_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


def _text_keys(obj: Any, source: str) -> dict[str, Any]:
    # Python 2 pickles loaded with encoding="bytes" have bytes keys; pickles written by Python 3 may not.
    if not isinstance(obj, dict):
        raise DataError(
            f"{source} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(
    obj: Any, source: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    d = _text_keys(obj, source)
    if "data" not in d or label_key not in d:
        raise DataError(
            f"{source} is not a CIFAR batch: it lacks the keys 'data' and '{label_key}' (has {sorted(d)})"
        )
    data, labels = d["data"], np.asarray(d[label_key])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        raise DataError(
            f"{source}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{source}: {len(data)} images but labels of shape {labels.shape} ({labels.dtype})"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels outside 0..{num_classes - 1}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _from_batches(files: dict[str, bytes], name: str, source: str, sep: str) -> ImageTree:
    """Parse the batch files; ``source + sep + file`` names a file in messages (``/`` or ``:``)."""
    train_names, test_names, meta_name, label_key, names_key = BATCH_FILES[name]
    known = KNOWN_CLASSES[name]
    classes = known
    if meta_name in files:
        where = f"{source}{sep}{meta_name}"
        meta = _text_keys(safe_loads(files[meta_name], where), where)
        names = meta.get(names_key)
        if isinstance(names, list) and len(names) == len(known):
            classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for batch_names in (train_names, test_names):
        parts = [
            _parse_batch(
                safe_loads(files[b], f"{source}{sep}{b}"),
                f"{source}{sep}{b}",
                label_key,
                len(known),
            )
            for b in batch_names
        ]
        splits.append(
            (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        )
    (train_x, train_y), (test_x, test_y) = splits
    return ImageTree(classes, train_x, train_y, test_x, test_y)


def _batch_names(name: str) -> set[str]:
    train_names, test_names, meta_name, _, _ = BATCH_FILES[name]
    return {*train_names, *test_names, meta_name}


def _read_batch_dir(folder: Path, name: str) -> ImageTree:
    files = {}
    for b in sorted(_batch_names(name)):
        path = folder / b
        if path.is_file():
            try:
                files[b] = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return _from_batches(files, name, str(folder), "/")


def _read_archive(path: Path, name: str) -> tuple[ImageTree, bool]:
    """Read a tar of official batches or of an image tree; returns (data, decoded from images?)."""
    wanted = _batch_names(name)
    members = read_tar(
        path, lambda m: PurePosixPath(m).name in wanted or image_member(m) is not None
    )
    batches = {PurePosixPath(m).name: b for m, b in members if PurePosixPath(m).name in wanted}
    train_names, test_names, *_ = BATCH_FILES[name]
    if all(b in batches for b in (*train_names, *test_names)):
        # Members are named archive:member in messages.
        return _from_batches(batches, name, str(path), ":"), False
    images = [(m, b) for m, b in members if image_member(m) is not None]
    if not images:
        raise DataError(
            f"{path} holds neither the official {name} batches ({', '.join(sorted(wanted))}) nor an "
            "image tree train/<class>/<image>, test/<class>/<image>"
        )
    return tree_from_members(
        images, str(path), f"decoding {name}", KNOWN_CLASSES[name], channels=3
    ), True


def load_cifar(found: Found, name: str) -> ImageTree:
    """Load CIFAR ``name`` (``"cifar10"`` or ``"cifar100"``) from the place :func:`locate` found.

    Raises:
        DataError: missing batch files, corrupt or unsafe pickles, truncated archives, bad images.
    """
    if found.kind == "cifar-batches":
        return _read_batch_dir(found.path, name)
    files = list_tree_dir(found.path) if found.kind == "image-tree" else []
    try:
        key = _cache.fingerprint(found.path, files)
    except OSError as exc:
        raise DataError(f"cannot read {found.path}: {exc.strerror or exc}") from exc
    cached = _cache.load_cached(name, key)
    if cached is not None:
        try:
            return ImageTree.from_arrays(cached)
        except (KeyError, ValueError) as exc:
            log.warning("ignoring a malformed cache entry for %s (%s)", name, exc)
    if found.kind == "image-tree":
        tree, decoded = (
            read_tree_dir(found.path, files, f"decoding {name}", KNOWN_CLASSES[name], channels=3),
            True,
        )
    else:
        tree, decoded = _read_archive(found.path, name)
    if decoded:
        # Only decoded images are worth caching; pickled batches load as fast as the cache would.
        _cache.save_cached(name, key, tree.arrays())
    return tree
