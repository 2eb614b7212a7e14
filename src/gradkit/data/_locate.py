"""Where dataset files are looked for, and which of the accepted layouts a place holds.

Roots are searched in order (the first one that holds a dataset wins):

1. the ``data_dir`` argument (CLI ``--data-dir``), or else ``$GRADKIT_DATA``;
2. ``~/.cache/gradkit`` (where ``--download`` puts files by default);
3. ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` installs there);
4. ``../shared/datasets`` next to the repository checkout, and next to the working directory.

Under each root a dataset may sit in any of several common folder or archive names (torchvision's
``FashionMNIST/raw``, the official ``cifar-10-batches-py``, an ``ImageFolder`` tree, ...). The user's own
root may also *be* the dataset folder (or archive) itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Found", "search_roots", "locate", "IDX_FILES", "CANDIDATES", "idx_file"]

# The four IDX files of MNIST-style datasets; each may be gzipped, and Kaggle copies use a dot
# ("train-images.idx3-ubyte") instead of the hyphen.
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# Relative paths tried under every root, in order. Directories are classified by what they hold
# (IDX files, pickled CIFAR batches or a train/test image tree); files must be tar archives.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "fashion-mnist",
        "fashion_mnist",
        "FashionMNIST/raw",
        "FashionMNIST",
        "fashionmnist",
    ),
    "mnist": ("mnist", "MNIST/raw", "MNIST", "mnist/raw"),
    "cifar10": (
        "cifar-10-batches-py",
        "cifar10/cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "cifar10/cifar-10-python.tar.gz",
        "cifar10",
        "cifar-10",
        "CIFAR10",
        "cifar10-jpeg.tar.gz",
        "cifar10.tar.gz",
        "cifar10.tgz",
        "cifar10.tar",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar100/cifar-100-python",
        "cifar-100-python.tar.gz",
        "cifar100/cifar-100-python.tar.gz",
        "cifar100",
        "cifar-100",
        "CIFAR100",
        "cifar100-jpeg.tar.gz",
        "cifar100.tar.gz",
        "cifar100.tgz",
        "cifar100.tar",
    ),
}

_CIFAR_BATCH_FILES = {
    "cifar10": (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ),
    "cifar100": ("train", "test"),
}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Debian packages such as dataset-fashion-mnist install here.
SYSTEM_ROOT = Path("/usr/share/datasets")


@dataclass(frozen=True)
class Found:
    """A place that holds a dataset.

    ``kind`` is ``"idx"`` (folder of IDX files), ``"cifar-batches"`` (folder of official pickled
    batches), ``"image-tree"`` (folder with ``train/<class>/*`` and ``test/<class>/*``) or
    ``"archive"`` (a tar file; its content is classified when it is read).
    """

    path: Path
    kind: str


def _repo_shared() -> Path | None:
    # src/gradkit/data/_locate.py -> parents[2] is "src" in a checkout; the shared folder sits next to
    # the repository root. An installed copy (site-packages) has no such neighbour.
    here = Path(__file__).resolve()
    if here.parents[2].name != "src":
        return None
    return here.parents[3].parent / "shared" / "datasets"


def _user_root(data_dir: str | os.PathLike[str] | None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("GRADKIT_DATA")
    return Path(env).expanduser() if env else None


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for datasets, in order, without duplicates.

    Args:
        data_dir: the user's folder (CLI ``--data-dir``); when ``None``, ``$GRADKIT_DATA`` if set.

    Returns:
        The roots, whether or not they exist (the error for a missing dataset lists them all).

    Example:
        >>> search_roots("/data")[0]
        PosixPath('/data')
    """
    roots: list[Path] = []
    user = _user_root(data_dir)
    if user is not None:
        roots.append(user)
    try:
        roots.append(Path.home() / ".cache" / "gradkit")
    except RuntimeError:  # no home directory can be determined (HOME unset, no passwd entry)
        pass
    roots.append(SYSTEM_ROOT)
    shared = _repo_shared()
    if shared is not None:
        roots.append(shared)
    roots.append(Path.cwd().parent / "shared" / "datasets")
    seen: set[Path] = set()
    unique = []
    for root in roots:
        key = root.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(root)
    return unique


def idx_file(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``, gzipped or not, hyphen or dot spelling; ``None`` if absent."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        path = folder / name
        if path.is_file():
            return path
    return None


def _has_image_tree(folder: Path) -> Path | None:
    """``folder`` (or its single subfolder) if it holds ``train/`` and ``test/`` class folders."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return folder
    try:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    return None


def _classify(path: Path, name: str) -> Found | None:
    if name in ("fashion-mnist", "mnist"):
        if path.is_dir() and all(idx_file(path, stem) for stem in IDX_FILES.values()):
            return Found(path, "idx")
        return None
    if path.is_file():
        return Found(path, "archive") if path.name.endswith(_ARCHIVE_SUFFIXES) else None
    if not path.is_dir():
        return None
    if all((path / f).is_file() for f in _CIFAR_BATCH_FILES[name]):
        return Found(path, "cifar-batches")
    tree = _has_image_tree(path)
    return Found(tree, "image-tree") if tree is not None else None


def locate(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Found | None, list[Path]]:
    """Find dataset ``name`` (a key of :data:`CANDIDATES`) under the search roots.

    Returns:
        ``(found, roots)``: the first match or ``None``, and the roots that were searched.
    """
    roots = search_roots(data_dir)
    user = _user_root(data_dir)
    for root in roots:
        relpaths = CANDIDATES[name]
        # Only the user's own root may be the dataset folder itself: a system-wide root holding IDX
        # files directly cannot tell MNIST from Fashion-MNIST.
        if user is not None and root == user:
            relpaths = (*relpaths, "")
        for rel in relpaths:
            path = root / rel if rel else root
            try:
                found = _classify(path, name)
            except OSError:  # unreadable folder: skip it, as if absent
                found = None
            if found is not None:
                return found, roots
    return None, roots
