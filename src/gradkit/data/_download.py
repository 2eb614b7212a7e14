"""Downloading the official dataset files, verified by SHA-256 and written atomically.

``fetch`` streams to ``<dest>.part`` in the destination folder, checks the byte count and the hash,
fsyncs, then renames over ``dest``: an interrupted or corrupt download never leaves a file under the
real name, and never leaves a ``.part`` behind.

Behind a proxy, urllib honours ``https_proxy``/``http_proxy``. To use a mirror, set
``GRADKIT_MIRROR`` to a base URL that serves ``<base>/<dataset>/<file>``, e.g.
``$GRADKIT_MIRROR/cifar10/cifar-10-python.tar.gz``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gradkit._fileio import fsync_dir
from gradkit.errors import ConfigError, DataError

__all__ = ["RemoteFile", "REMOTE_FILES", "fetch", "download", "default_download_root"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """One official file: where it comes from, its SHA-256, and where it goes under the root."""

    url: str
    sha256: str
    relpath: str


_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist"  # the mirror torchvision uses
_KRIZ = "https://www.cs.toronto.edu/~kriz"

REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": (
        RemoteFile(f"{_FASHION}/train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", "fashion-mnist/train-images-idx3-ubyte.gz"),
        RemoteFile(f"{_FASHION}/train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", "fashion-mnist/train-labels-idx1-ubyte.gz"),
        RemoteFile(f"{_FASHION}/t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", "fashion-mnist/t10k-images-idx3-ubyte.gz"),
        RemoteFile(f"{_FASHION}/t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", "fashion-mnist/t10k-labels-idx1-ubyte.gz"),
    ),
    "mnist": (
        RemoteFile(f"{_MNIST}/train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", "mnist/train-images-idx3-ubyte.gz"),
        RemoteFile(f"{_MNIST}/train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", "mnist/train-labels-idx1-ubyte.gz"),
        RemoteFile(f"{_MNIST}/t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", "mnist/t10k-images-idx3-ubyte.gz"),
        RemoteFile(f"{_MNIST}/t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", "mnist/t10k-labels-idx1-ubyte.gz"),
    ),
    "cifar10": (
        RemoteFile(f"{_KRIZ}/cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", "cifar-10-python.tar.gz"),
    ),
    "cifar100": (
        RemoteFile(f"{_KRIZ}/cifar-100-python.tar.gz", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", "cifar-100-python.tar.gz"),
    ),
}  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, verify its SHA-256, and move it into place atomically.

    Args:
        url: what to download (``http``, ``https`` or ``file``).
        dest: the final file; its folder is created.
        sha256: expected hex digest.
        timeout: seconds to wait for the connection or for each read.

    Returns:
        ``dest``.

    Raises:
        DataError: the server fails or cannot be reached, the transfer stops early, or the hash differs.
            ``dest`` is then left untouched and no ``.part`` file remains.

    Example:
        >>> fetch("https://example.org/f.gz", Path("f.gz"), "ab12...")  # doctest: +SKIP
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create {dest.parent} to download {url}: {exc.strerror or exc}"
        ) from exc
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "gradkit"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected, desc=dest.name, unit="B", unit_scale=True, disable=None, leave=False
            ) as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            # http.client returns b"" when the connection closes early rather than raising, so the
            # byte count is checked here.
            if expected is not None and received != expected:
                raise DataError(
                    f"download of {url} is truncated: got {received} of {expected} bytes; try again "
                    "(or set GRADKIT_MIRROR to another mirror)"
                )
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256.lower():
            raise DataError(
                f"download of {url} is corrupt: SHA-256 expected {sha256.lower()}, got {got} "
                f"({received} bytes); not saved to {dest}"
            )
        os.replace(part, dest)
        fsync_dir(dest.parent)
    except DataError:
        part.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        part.unlink(missing_ok=True)
        raise DataError(
            f"cannot download {url}: {exc.reason}; check the network or proxy (https_proxy), "
            "or set GRADKIT_MIRROR"
        ) from exc
    except (TimeoutError, http.client.HTTPException, OSError) as exc:
        part.unlink(missing_ok=True)
        what = (
            "timed out"
            if isinstance(exc, TimeoutError)
            else f"failed ({type(exc).__name__}: {exc})"
        )
        raise DataError(f"download of {url} {what} after {received} bytes; try again") from exc
    except BaseException:
        # KeyboardInterrupt and the like: still no .part left behind.
        part.unlink(missing_ok=True)
        raise
    log.info("downloaded %s to %s (%d bytes, SHA-256 ok)", url, dest, received)
    return dest


def default_download_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloads go: ``data_dir``, else ``$GRADKIT_DATA``, else ``~/.cache/gradkit``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("GRADKIT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gradkit"


def _url(name: str, remote: RemoteFile) -> str:
    mirror = os.environ.get("GRADKIT_MIRROR", "").strip()
    if not mirror:
        return remote.url
    return f"{mirror.rstrip('/')}/{name}/{remote.url.rsplit('/', 1)[1]}"


def download(name: str, root: Path | None = None) -> Path:
    """Download dataset ``name``'s official files under ``root`` (skipping files already verified).

    Args:
        name: ``fashion-mnist``, ``mnist``, ``cifar10`` or ``cifar100``.
        root: folder to put them in; default :func:`default_download_root`.

    Returns:
        The dataset's folder (IDX datasets) or archive (CIFAR) under ``root``.

    Raises:
        ConfigError: ``name`` has no download (e.g. ``digits``, which needs none).
        DataError: a download fails (see :func:`fetch`).

    Example:
        >>> download("fashion-mnist")  # doctest: +SKIP
        PosixPath('/home/me/.cache/gradkit/fashion-mnist')
    """
    if name not in REMOTE_FILES:
        raise ConfigError(
            f"dataset {name!r} has nothing to download; downloadable: {', '.join(REMOTE_FILES)}"
        )
    root = default_download_root() if root is None else Path(root).expanduser()
    for remote in REMOTE_FILES[name]:
        dest = root / remote.relpath
        if dest.is_file() and _sha256(dest) == remote.sha256:
            log.info("%s is already downloaded and verified", dest)
            continue
        url = _url(name, remote)
        log.info("downloading %s to %s", url, dest)
        fetch(url, dest, remote.sha256)
    first = root / REMOTE_FILES[name][0].relpath
    return first.parent if len(REMOTE_FILES[name]) > 1 else first
