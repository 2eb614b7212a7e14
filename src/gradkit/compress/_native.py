"""The fused CPU kernels of ``_kernels.c``: compiled on first use, called through ctypes.

Why: the torch path of pack/unpack and of the BLPA unit issues ~20 elementwise operations per cache
block, thousands per training step, and costs ResNet-20 40-60% of an exact step on a 2-core CPU; one
fused pass per tensor costs a fraction of that (benchmarks/approx-activations, section 2).

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``) into a cache folder
(``$GRADKIT_CACHE_DIR``, else ``~/.cache/gradkit``), keyed by the source, the flags and the CPU, and
written atomically, so concurrent processes (one per pipeline stage) share one build. Without a
compiler, or with ``GRADKIT_KERNELS=torch``, everything runs on the pure-torch path, which computes
the same codes (tests compare the two).

Work is split into contiguous ranges across ``torch.get_num_threads()`` Python threads: ctypes releases
the GIL for the call, and per-group random streams make the result independent of the split.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["MAX_GROUP", "kernels", "usable", "parallel"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_kernels.c")
# No FP contraction: a fused multiply-add would round differently from torch's separate mul and add.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
# Largest quantisation group (and BLPA chunk) the kernels hold on their stack; MAX_GROUP in the C file.
MAX_GROUP = 4096
# Below this many elements a tensor is not worth splitting across threads.
_PARALLEL_MIN = 1 << 18

_I64, _U64, _INT, _P = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, list[type]] = {
    "gk_minmax": [_P, _I64, _I64, _I64, _I64, _P, _P],
    "gk_ranges": [_P, _P, _I64, _INT, _INT, ctypes.c_float, _P, _P, _P, _P, _P],
    "gk_pack": [_P, _I64, _I64, _I64, _I64, _P, _P, _INT, _INT, _U64, _P, _P],
    "gk_unpack": [_P, _I64, _I64, _I64, _I64, _INT, _P, _P, _P, _P],
    "gk_moments": [_P, _I64, _I64, _I64, _I64, _P, _P, _P],
    "gk_blpa_encode": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _INT, _P, _P],
    "gk_blpa_decode": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _INT, _P],
    "gk_blpa_mask_sums": [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _INT, _P, _P],
    "gk_blpa_grad_input": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _INT],
}

_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:
    # A forked child inherits the pool object but not its threads.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL | None:
    if os.environ.get("GRADKIT_KERNELS", "").lower() == "torch":
        return None
    if platform.system() not in ("Linux", "Darwin"):
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found; gradkit.compress uses its torch kernels")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS]).encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GRADKIT_CACHE_DIR") or Path.home() / ".cache" / "gradkit")
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        tmp: str | None = None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            started = time.perf_counter()
            subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                           timeout=120)
            os.replace(tmp, target)  # atomic: a concurrent builder's result is equally good
            log.info("built gradkit's compression kernels in %.1f s: %s", time.perf_counter() - started, target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = (getattr(exc, "stderr", None) or b"").decode(errors="replace").strip()
            log.warning("could not build gradkit's compression kernels (%s%s); using the torch path",
                        exc, f": {detail[:200]}" if detail else "")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("could not load %s (%s); using the torch path", target, exc)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name == "gk_ranges" else None
    return lib


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None when unavailable or disabled."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels exist and can read these tensors in place (CPU, contiguous)."""
    return kernels() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def parallel(work: Callable[[int, int], None], total: int, elements: int) -> None:
    """Run ``work(begin, end)`` over ``[0, total)``, split across torch's thread count when
    ``elements`` (the data size behind ``total``) makes it worthwhile."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    chunks = min(threads, total)
    if chunks <= 1 or elements < _PARALLEL_MIN:
        work(0, total)
        return
    if _pool is None or _pool_size != threads:  # rebuilt only when torch's thread count changes
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="gradkit-kernels")
        _pool_size = threads
    bounds = [total * i // chunks for i in range(chunks + 1)]
    futures = [_pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, chunks)]
    work(bounds[0], bounds[1])
    for f in futures:
        f.result()
