"""Reading IDX files, the format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. Files may be gzip-compressed; we tell by
the gzip magic bytes, not by the file name. Everything that can go wrong is a one-line
:class:`~gradkit.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from gradkit.errors import DataError

__all__ = ["read_idx", "IDX_DTYPES"]

# Type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise DataError(f"{path} is truncated: the gzip stream ends early ({exc})") from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path} is corrupt: not a valid gzip stream ({exc})") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a native-endian numpy array.

    Args:
        path: the file.

    Returns:
        A writable array of the file's type and shape, e.g. ``uint8`` ``(60000, 28, 28)``.

    Raises:
        DataError: the file is missing, not IDX (bad magic number), or its length does not match the
            dimensions in its header (truncated or with trailing garbage).

    Example:
        >>> labels = read_idx("fashion-mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
        >>> labels.shape
        (10000,)
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte IDX header"
        )
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 then a type code 08/09/0b/0c/0d/0e and the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: the header needs {header} bytes, the file has {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a forged header cannot wrap around
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: dimensions {'x'.join(map(str, dims))} need {expected} bytes of data, "
            f"found {got}"
        )
    # frombuffer over bytes is read-only; a native-endian copy is writable and torch-friendly.
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)
