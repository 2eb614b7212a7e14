"""fetch() and download() against a local HTTP server: good, truncated, wrong and missing files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradkit.data import _download, download, fetch, load_dataset
from gradkit.data._download import RemoteFile
from gradkit.errors import ConfigError, DataError

GOOD = bytes(range(256)) * 400  # 100 KiB: several read chunks
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class Server:
    """Serves ``routes``: path -> (body, declared Content-Length or None); counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, length = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # Never send 127.0.0.1 through a proxy from the environment.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    s = Server()
    yield s
    s.close()


def test_good_file_lands_with_hash_ok(server: Server, tmp_path: Path) -> None:
    server.routes["/good.bin"] = (GOOD, None)
    dest = tmp_path / "sub" / "good.bin"
    assert fetch(f"{server.url}/good.bin", dest, GOOD_SHA) == dest
    assert dest.read_bytes() == GOOD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["good.bin"]


@pytest.mark.parametrize("declared_extra", [1, 5000])
def test_truncated_transfer(server: Server, tmp_path: Path, declared_extra: int) -> None:
    # The server promises more bytes than it sends, then closes the connection.
    server.routes["/short.bin"] = (GOOD[:50000], 50000 + declared_extra)
    dest = tmp_path / "short.bin"
    with pytest.raises(DataError, match="truncated") as info:
        fetch(f"{server.url}/short.bin", dest, GOOD_SHA)
    assert "50000 of" in str(info.value) and f"{server.url}/short.bin" in str(info.value)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no .part left behind


def test_wrong_file_hash_mismatch(server: Server, tmp_path: Path) -> None:
    wrong = GOOD[::-1]
    server.routes["/wrong.bin"] = (wrong, None)
    dest = tmp_path / "wrong.bin"
    with pytest.raises(DataError) as info:
        fetch(f"{server.url}/wrong.bin", dest, GOOD_SHA)
    message = str(info.value)
    assert GOOD_SHA in message and hashlib.sha256(wrong).hexdigest() in message
    assert "\n" not in message
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_existing_file_kept_when_download_fails(server: Server, tmp_path: Path) -> None:
    server.routes["/wrong.bin"] = (b"not it", None)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DataError):
        fetch(f"{server.url}/wrong.bin", dest, GOOD_SHA)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_http_error_and_unreachable(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(f"{server.url}/missing.bin", tmp_path / "m.bin", GOOD_SHA)
    # A port nobody listens on: the server's, after it is closed.
    url = f"{server.url}/good.bin"
    server.close()
    with pytest.raises(DataError, match="cannot download"):
        fetch(url, tmp_path / "m.bin", GOOD_SHA, timeout=5)
    assert list(tmp_path.iterdir()) == []


def idx_gz(array: np.ndarray) -> bytes:
    import struct

    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_download_through_mirror_then_load(
    server: Server, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download=True fetches from $GRADKIT_MIRROR/<dataset>/<file>, verifies, and loads; a second
    download finds the verified files and fetches nothing."""
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (20, 28, 28))),
        "train-labels-idx1-ubyte.gz": idx_gz(np.arange(20) % 10),
        "t10k-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (10, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": idx_gz(np.arange(10) % 10),
    }
    remote = tuple(
        RemoteFile(
            f"https://invalid.example/{name}", hashlib.sha256(body).hexdigest(), f"mnist/{name}"
        )
        for name, body in files.items()
    )
    monkeypatch.setitem(_download.REMOTE_FILES, "mnist", remote)
    for name, body in files.items():
        server.routes[f"/mirror/mnist/{name}"] = (body, None)
    monkeypatch.setenv("GRADKIT_MIRROR", f"{server.url}/mirror/")

    ds = load_dataset("mnist", isolated, download=True)
    assert len(ds.train_y) == 20 and len(ds.test_y) == 10
    assert ds.info.source == str(isolated / "mnist")
    assert sorted(server.requests) == sorted(f"/mirror/mnist/{n}" for n in files)

    server.requests.clear()
    assert download("mnist", isolated) == isolated / "mnist"
    assert server.requests == []


def test_download_default_root_is_home_cache(
    server: Server, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/cifar10/cifar-10-python.tar.gz"] = (GOOD, None)
    monkeypatch.setitem(
        _download.REMOTE_FILES,
        "cifar10",
        (
            RemoteFile(
                "https://invalid.example/cifar-10-python.tar.gz", GOOD_SHA, "cifar-10-python.tar.gz"
            ),
        ),
    )
    monkeypatch.setenv("GRADKIT_MIRROR", server.url)
    path = download("cifar10")
    assert path == Path.home() / ".cache" / "gradkit" / "cifar-10-python.tar.gz"
    assert path.read_bytes() == GOOD


def test_download_unknown_and_official_table() -> None:
    with pytest.raises(ConfigError, match="nothing to download"):
        download("digits")
    for name, remotes in _download.REMOTE_FILES.items():
        for r in remotes:
            assert len(r.sha256) == 64 and int(r.sha256, 16) >= 0, (name, r)
    assert (
        _download.REMOTE_FILES["cifar10"][0].url
        == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert _download.REMOTE_FILES["mnist"][0].url.startswith(
        "https://ossci-datasets.s3.amazonaws.com/mnist/"
    )
