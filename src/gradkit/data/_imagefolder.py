"""Image-folder datasets: ``train/<class>/*.jpg|png`` and ``test/<class>/...``, in a folder or a tar.

This is the common "ImageFolder" layout (the shared CIFAR-10 copy is a ``.tar.gz`` of one). The tree may
sit under one top folder (``cifar10/train/...``). Class indices follow a known class list when the folder
names match it exactly (CIFAR's label order), else sorted folder names. Decoding uses Pillow, an optional
dependency, in a small thread pool (Pillow releases the GIL while it decodes) with a tqdm bar.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from gradkit.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageTree",
    "decode_images",
    "class_order",
    "tree_from_members",
    "list_tree_dir",
    "read_tree_dir",
    "read_tar",
    "image_member",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
_SPLITS = ("train", "test")
_CHUNK = 1000


@dataclass
class ImageTree:
    """Decoded splits of an image tree; ``*_x`` are uint8 ``(N, C, H, W)``, ``*_y`` int64."""

    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to cache (class names as a fixed-width unicode array: no pickle needed)."""
        return {
            "classes": np.array(self.classes, dtype=str),
            "train_x": self.train_x,
            "train_y": self.train_y,
            "test_x": self.test_x,
            "test_y": self.test_y,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ImageTree:
        """Inverse of :meth:`arrays`."""
        return cls(
            tuple(str(c) for c in arrays["classes"]),
            arrays["train_x"],
            arrays["train_y"].astype(np.int64),
            arrays["test_x"],
            arrays["test_y"].astype(np.int64),
        )


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(
            "reading JPEG/PNG image folders needs Pillow, which is not installed: pip install Pillow"
        ) from None
    return Image, UnidentifiedImageError


def image_member(relpath: str) -> tuple[tuple[str, ...], str, str] | None:
    """``(prefix, split, class)`` if ``relpath`` looks like ``[prefix/]split/class/file.jpg``, else None."""
    parts = PurePosixPath(relpath).parts
    if len(parts) < 3 or parts[-3] not in _SPLITS:
        return None
    # Skip hidden files, including macOS's "._name.jpg" resource forks that tar often carries along.
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    return tuple(parts[:-3]), parts[-3], parts[-2]


def class_order(names: set[str], known: Sequence[str] = ()) -> tuple[str, ...]:
    """Class names by label: the ``known`` list when ``names`` is exactly that set, else sorted."""
    if known and names == set(known):
        return tuple(known)
    return tuple(sorted(names))


def _decode_chunk(
    blobs: Sequence[bytes], names: Sequence[str], out: np.ndarray, start: int, mode: str, bar: tqdm
) -> None:
    Image, UnidentifiedImageError = _pillow()
    size = (out.shape[3], out.shape[2])
    for i, (blob, name) in enumerate(zip(blobs, names, strict=True)):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.size != size:
                    raise DataError(
                        f"{name} is {im.size[0]}x{im.size[1]} pixels, but the dataset's images are "
                        f"{size[0]}x{size[1]}: all images must have one size"
                    )
                if im.mode != mode:
                    im = im.convert(mode)
                pixels = np.frombuffer(im.tobytes(), dtype=np.uint8)
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(name, exc) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot decode image {name}: {exc}") from exc
        # HWC -> CHW for this one image; cheaper than transposing the whole array afterwards.
        out[start + i] = pixels.reshape(size[1], size[0], -1).transpose(2, 0, 1)
    bar.update(len(blobs))


def decode_images(
    blobs: Sequence[bytes], names: Sequence[str], desc: str, channels: int | None = None
) -> np.ndarray:
    """Decode encoded images into one uint8 ``(N, C, H, W)`` array.

    Args:
        blobs: the encoded files' bytes.
        names: file names for error messages, one per blob.
        desc: label of the progress bar.
        channels: 1 (grey) or 3 (RGB); ``None`` takes it from the first image.

    Raises:
        DataError: Pillow is missing, an image cannot be decoded, or the sizes differ.
    """
    Image, UnidentifiedImageError = _pillow()
    if not blobs:
        raise DataError(f"{desc}: no images to decode")
    with warnings.catch_warnings():
        # Pillow only warns about an image of more than half its pixel limit; here that is an error too
        # (the filter also covers the decoding threads below, which run within this call).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode_all(Image, UnidentifiedImageError, blobs, names, desc, channels)


def _bomb(name: str, exc: BaseException) -> DataError:
    return DataError(f"{name} is too large to decode safely ({_first_sentence(exc)}): a decompression bomb "
                     "or not an image of this dataset; remove it from the dataset folder")


def _first_sentence(exc: BaseException) -> str:
    return str(exc).split(". ")[0].splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__


def _decode_all(Image, UnidentifiedImageError, blobs: Sequence[bytes], names: Sequence[str],  # noqa: ANN001,N803
                desc: str, channels: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blobs[0])) as first:
            width, height = first.size
            first_mode = first.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(names[0], exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {names[0]}: {exc}") from exc
    if channels is None:
        channels = 1 if first_mode in ("1", "L", "I", "I;16", "F") else 3
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(blobs), channels, height, width), dtype=np.uint8)
    # One decoding thread per two cores: Pillow releases the GIL while decoding, but the per-image
    # Python overhead does not, so more threads than that only contend (measured on 2 cores).
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    with tqdm(total=len(blobs), desc=desc, unit="img", disable=None, leave=False) as bar:
        starts = range(0, len(blobs), _CHUNK)
        if workers == 1:
            for s in starts:
                _decode_chunk(blobs[s : s + _CHUNK], names[s : s + _CHUNK], out, s, mode, bar)
        else:
            with ThreadPoolExecutor(workers) as pool:
                futures = [
                    pool.submit(
                        _decode_chunk,
                        blobs[s : s + _CHUNK],
                        names[s : s + _CHUNK],
                        out,
                        s,
                        mode,
                        bar,
                    )
                    for s in starts
                ]
                for f in futures:
                    f.result()
    return out


def tree_from_members(
    members: Sequence[tuple[str, bytes]],
    source: str,
    desc: str,
    known: Sequence[str] = (),
    channels: int | None = None,
) -> ImageTree:
    """Build an :class:`ImageTree` from ``(relative path, bytes)`` pairs of image files.

    Args:
        members: image files; paths like ``[top/]train/<class>/<file>``.
        source: the folder or archive, for error messages.
        desc: label of the progress bar.
        known: class names in label order, used when the class folders match them.
        channels: see :func:`decode_images`.

    Raises:
        DataError: no images, several trees, a split missing, test classes not in train.
    """
    parsed = []
    prefixes = set()
    for relpath, blob in members:
        info = image_member(relpath)
        if info is not None:
            prefix, split, cls = info
            prefixes.add(prefix)
            parsed.append((split, cls, relpath, blob))
    if not parsed:
        raise DataError(
            f"{source} holds no images in the layout train/<class>/<image> and test/<class>/<image> "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    if len(prefixes) > 1:
        shown = ", ".join(sorted("/".join(p) or "." for p in prefixes)[:4])
        raise DataError(f"{source} holds several image trees ({shown}); keep one train/test tree")
    # Sorted by path so the order does not depend on the archive's or the file system's order.
    parsed.sort(key=lambda item: item[2])
    classes_in = {split: {cls for s, cls, _, _ in parsed if s == split} for split in _SPLITS}
    for split in _SPLITS:
        if not classes_in[split]:
            raise DataError(
                f"{source} has no {split}/<class>/ images; both train/ and test/ are needed"
            )
    extra = classes_in["test"] - classes_in["train"]
    if extra:
        raise DataError(f"{source}: test classes {sorted(extra)} have no train images")
    classes = class_order(classes_in["train"], known)
    label = {c: i for i, c in enumerate(classes)}
    x = decode_images(
        [b for *_, b in parsed], [f"{source}:{p}" for _, _, p, _ in parsed], desc, channels
    )
    y = np.array([label[cls] for _, cls, _, _ in parsed], dtype=np.int64)
    is_train = np.array([s == "train" for s, *_ in parsed])
    return ImageTree(classes, x[is_train], y[is_train], x[~is_train], y[~is_train])


def list_tree_dir(root: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every image under ``root/{train,test}/<class>/``."""
    rows = []
    for split in _SPLITS:
        base = root / split
        if not base.is_dir():
            continue
        for class_dir in sorted(base.iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            with os.scandir(class_dir) as it:
                for entry in it:
                    if entry.is_file() and image_member(f"{split}/{class_dir.name}/{entry.name}"):
                        st = entry.stat()
                        rows.append(
                            (f"{split}/{class_dir.name}/{entry.name}", st.st_size, st.st_mtime_ns)
                        )
    rows.sort()
    return rows


def read_tree_dir(
    root: Path,
    files: Sequence[tuple[str, int, int]],
    desc: str,
    known: Sequence[str] = (),
    channels: int | None = None,
) -> ImageTree:
    """Read and decode the images ``files`` (from :func:`list_tree_dir`) under ``root``."""
    members = []
    for relpath, _, _ in files:
        try:
            members.append((relpath, (root / relpath).read_bytes()))
        except OSError as exc:
            raise DataError(f"cannot read {root / relpath}: {exc.strerror or exc}") from exc
    return tree_from_members(members, str(root), desc, known, channels)


def read_tar(path: Path, keep: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular members of tar ``path`` for which ``keep(name)`` is true.

    Reads the archive once, as a stream (gzip, bz2, xz or none), without extracting anything to disk.

    Raises:
        DataError: the archive is truncated or corrupt.
    """
    out = []
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if member.isfile() and keep(member.name):
                    f = tf.extractfile(member)
                    if f is not None:
                        out.append((member.name, f.read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"{path} is truncated or corrupt: cannot read it as a tar archive ({exc})"
        ) from exc
    return out
