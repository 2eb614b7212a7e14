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

Memory safety: callers go through the typed wrappers below (:func:`minmax`, :func:`pack`, ...), never
``lib.gk_*`` directly. They check every tensor's dtype, device, contiguity and length against what the
call will touch and raise :class:`KernelError` before calling; the C functions check their scalar
arguments again (bits, group size, counts, ranges) and return an error code, which becomes the same
exception. ``$GRADKIT_KERNEL_FLAGS`` adds compiler flags (e.g. AddressSanitizer for tests); they are
part of the cache key.
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
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from gradkit.errors import KernelError

__all__ = ["MAX_GROUP", "KernelError", "kernels", "usable", "parallel", "minmax", "ranges", "pack", "unpack",
           "moments", "blpa_encode", "blpa_decode", "blpa_mask_sums", "blpa_grad_input"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_kernels.c")
# No FP contraction: a fused multiply-add would round differently from torch's separate mul and add.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
# Largest quantisation group (and BLPA chunk) the kernels hold on their stack, passed to the C file as
# -DMAX_GROUP. The one limit on group sizes: gradkit.compress.MAX_GROUP_SIZE, TrainConfig and the CLI use it.
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
    "gk_max_group": [],
}
# The C file's GK_E* codes.
_ERRORS = {
    -2: "bits must be 2, 4 or 8",
    -3: f"group size must be a multiple of 8 between 8 and {MAX_GROUP}",
    -4: "negative or overflowing element, sample or channel count",
    -5: "begin/end range outside the data",
    -6: "rounding mode must be 0..2, and mode 2 needs noise",
    -7: "a needed buffer is NULL",
    -8: "a plane's codes must fill whole bytes (H*W*bits a multiple of 8)",
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


def _extra_flags() -> list[str]:
    return os.environ.get("GRADKIT_KERNEL_FLAGS", "").split()


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
    flags = [*_FLAGS, f"-DMAX_GROUP={MAX_GROUP}", *_extra_flags()]
    key = hashlib.sha256(source + " ".join([cc, *flags]).encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GRADKIT_CACHE_DIR") or Path.home() / ".cache" / "gradkit")
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        tmp: str | None = None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            started = time.perf_counter()
            subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
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
    try:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    except AttributeError as exc:  # a stale or foreign library: never call into it
        log.warning("%s lacks a kernel (%s); using the torch path", target, exc)
        return None
    if lib.gk_max_group() != MAX_GROUP:
        log.warning("%s was built for groups of %d, not %d; using the torch path", target,
                    lib.gk_max_group(), MAX_GROUP)
        return None
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


def parallel(work: Callable[[int, int], object], total: int, elements: int) -> None:
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
    try:
        work(bounds[0], bounds[1])
    finally:
        # Never return or raise while a worker may still write into the caller's buffers.
        wait(futures)
    for f in futures:
        f.result()


# -- checked entry points -------------------------------------------------------------------------
def _lib_or_raise() -> ctypes.CDLL:
    lib = kernels()
    if lib is None:
        raise KernelError("the native kernels are not available")
    return lib


def _ok(name: str, rc: int) -> int:
    if rc < -1:
        raise KernelError(f"{name}: {_ERRORS.get(rc, f'error {rc}')}")
    return rc


def _buffer(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> int:
    """``t``'s address after checking that it can hold ``numel`` elements of ``dtype`` in place."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        what = f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}" if isinstance(t, torch.Tensor) \
            else type(t).__name__
        raise KernelError(f"{name} must be a contiguous CPU {dtype} tensor, got {what}")
    if t.numel() < numel:
        raise KernelError(f"{name} holds {t.numel()} elements, the kernel needs {numel}")
    return int(t.data_ptr())


def _check_group(group_size: int, bits: int | None = None) -> None:
    if not isinstance(group_size, int) or group_size < 8 or group_size > MAX_GROUP or group_size % 8:
        raise KernelError(f"group size must be a multiple of 8 between 8 and {MAX_GROUP}, got {group_size}")
    if bits is not None and bits not in (2, 4, 8):
        raise KernelError(f"bits must be 2, 4 or 8, got {bits}")


def minmax(x: torch.Tensor, group_size: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Per-group minimum and maximum of float32 ``x`` (flattened) into ``lo``/``hi`` (one per group)."""
    lib = _lib_or_raise()
    _check_group(group_size)
    n = x.numel()
    groups = -(-n // group_size)
    px = _buffer("x", x, torch.float32, n)
    plo, phi = _buffer("lo", lo, torch.float32, groups), _buffer("hi", hi, torch.float32, groups)
    parallel(lambda a, b: _ok("gk_minmax", lib.gk_minmax(px, n, group_size, a, b, plo, phi)), groups, n)


def ranges(mn: torch.Tensor, mx: torch.Tensor, bits: int, try_half: bool, safety: float, lo32: torch.Tensor,
           step32: torch.Tensor, lo16: torch.Tensor, step16: torch.Tensor, inv: torch.Tensor) -> int:
    """``gk_ranges``: 1 (float16 ranges), 0 (float32 ranges) or -1 (no _Float16: use torch)."""
    lib = _lib_or_raise()
    groups = mn.numel()
    f32, f16 = torch.float32, torch.float16
    ptrs = [_buffer("mn", mn, f32, groups), _buffer("mx", mx, f32, groups), _buffer("lo32", lo32, f32, groups),
            _buffer("step32", step32, f32, groups), _buffer("lo16", lo16, f16, groups),
            _buffer("step16", step16, f16, groups), _buffer("inv", inv, f32, groups)]
    return _ok("gk_ranges", lib.gk_ranges(ptrs[0], ptrs[1], groups, bits, int(try_half), safety, *ptrs[2:]))


def pack(x: torch.Tensor, group_size: int, lo: torch.Tensor, inv: torch.Tensor, bits: int, mode: int,
         seed: int, noise: torch.Tensor | None, out: torch.Tensor) -> None:
    """Codes of float32 ``x`` (flattened) into ``out`` (``groups * group_size * bits / 8`` bytes).

    ``mode``: 0 nearest, 1 stochastic from ``seed``, 2 stochastic from ``noise`` (one float32 per
    element of the padded groups)."""
    lib = _lib_or_raise()
    _check_group(group_size, bits)
    n = x.numel()
    groups = -(-n // group_size)
    if mode not in (0, 1, 2) or (mode == 2) != (noise is not None):
        raise KernelError(f"mode must be 0, 1 or 2 (2 exactly when noise is given), got {mode}")
    px = _buffer("x", x, torch.float32, n)
    plo, pinv = _buffer("lo", lo, torch.float32, groups), _buffer("inv", inv, torch.float32, groups)
    pnoise = None if noise is None else _buffer("noise", noise, torch.float32, groups * group_size)
    pout = _buffer("out", out, torch.uint8, groups * group_size * bits // 8)
    parallel(lambda a, b: _ok("gk_pack", lib.gk_pack(px, n, group_size, a, b, plo, pinv, bits, mode,
                                                     seed % 2**64, pnoise, pout)), groups, n)


def unpack(data: torch.Tensor, n: int, group_size: int, bits: int, step: torch.Tensor, offset: torch.Tensor,
           floor: torch.Tensor, out: torch.Tensor) -> None:
    """Decode ``n`` elements from ``data`` (``ceil(n / group_size)`` groups of codes) into float32 ``out``."""
    lib = _lib_or_raise()
    _check_group(group_size, bits)
    if n < 0:
        raise KernelError(f"element count must be >= 0, got {n}")
    groups = -(-n // group_size)
    pdata = _buffer("data", data, torch.uint8, groups * group_size * bits // 8)
    terms = [_buffer(name, t, torch.float32, groups) for name, t in (("step", step), ("offset", offset),
                                                                    ("floor", floor))]
    pout = _buffer("out", out, torch.float32, n)
    parallel(lambda a, b: _ok("gk_unpack", lib.gk_unpack(pdata, n, group_size, a, b, bits, *terms, pout)),
             groups, n)


def _planes(x: torch.Tensor, bits: int | None) -> tuple[int, int, int]:
    """Samples, channels and H*W of an NCHW tensor, checked for the BLPA kernels."""
    if x.dim() != 4:
        raise KernelError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    n, c, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    if bits is not None:
        if bits not in (2, 4, 8):
            raise KernelError(f"bits must be 2, 4 or 8, got {bits}")
        if (hw * bits) % 8:
            raise KernelError(f"H*W*bits must be a multiple of 8, got H*W={hw}, bits={bits}")
    return n, c, hw


def _channels(c: int, **vectors: torch.Tensor) -> list[int]:
    return [_buffer(name, t, torch.float32, c) for name, t in vectors.items()]


def _sums(name: str, run: Callable[[int, int, int, int], int], samples: int, c: int,
          elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-channel float64 sums accumulated by ``run(begin, end, out1, out2)`` over sample ranges
    (one pair of accumulators per thread, added at the end)."""
    parts: list[torch.Tensor] = []

    def work(a: int, b: int) -> None:
        sums = torch.zeros(2, c, dtype=torch.float64)
        _ok(name, run(a, b, sums[0].data_ptr(), sums[1].data_ptr()))
        parts.append(sums)

    parallel(work, samples, elements)
    total = torch.stack(parts).sum(0) if parts else torch.zeros(2, c, dtype=torch.float64)
    return total[0], total[1]


def moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 ``sum(x - shift)`` and ``sum((x - shift)**2)`` of float32 NCHW ``x``."""
    lib = _lib_or_raise()
    n, c, hw = _planes(x, None)
    px = _buffer("x", x, torch.float32, x.numel())
    (pshift,) = _channels(c, shift=shift)
    return _sums("gk_moments", lambda a, b, o1, o2: lib.gk_moments(px, a, b, c, hw, pshift, o1, o2),
                 n, c, x.numel())


def blpa_encode(x: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor, scale_y: torch.Tensor,
                shift_y: torch.Tensor, offset: torch.Tensor, c_t: torch.Tensor, bits: int, y: torch.Tensor,
                packed: torch.Tensor) -> None:
    """BLPA forward: the conv input into ``y`` (like ``x``) and packed codes into ``packed``."""
    lib = _lib_or_raise()
    n, c, hw = _planes(x, bits)
    px = _buffer("x", x, torch.float32, x.numel())
    vec = _channels(c, a_v=a_v, b_v=b_v, scale_y=scale_y, shift_y=shift_y, offset=offset, c_t=c_t)
    py = _buffer("y", y, torch.float32, x.numel())
    pp = _buffer("packed", packed, torch.uint8, x.numel() * bits // 8)
    parallel(lambda a, b: _ok("gk_blpa_encode", lib.gk_blpa_encode(px, a, b, c, hw, *vec, bits, py, pp)),
             n, x.numel())


def blpa_decode(packed: torch.Tensor, y: torch.Tensor, centre: torch.Tensor, c_t: torch.Tensor,
                scale_y: torch.Tensor, shift_y: torch.Tensor, bits: int) -> None:
    """BLPA backward step 1: the conv input into float32 NCHW ``y`` from the codes."""
    lib = _lib_or_raise()
    n, c, hw = _planes(y, bits)
    pp = _buffer("packed", packed, torch.uint8, y.numel() * bits // 8)
    vec = _channels(c, centre=centre, c_t=c_t, scale_y=scale_y, shift_y=shift_y)
    py = _buffer("y", y, torch.float32, y.numel())
    parallel(lambda a, b: _ok("gk_blpa_decode", lib.gk_blpa_decode(pp, a, b, c, hw, *vec, bits, py)),
             n, y.numel())


def blpa_mask_sums(g: torch.Tensor, y: torch.Tensor, packed: torch.Tensor, centre: torch.Tensor,
                   c_t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BLPA backward step 2: ``g *= (y > 0)`` in place; per-channel float64 sums of g and g*v."""
    lib = _lib_or_raise()
    n, c, hw = _planes(g, bits)
    pg = _buffer("g", g, torch.float32, g.numel())
    py = _buffer("y", y, torch.float32, g.numel())
    pp = _buffer("packed", packed, torch.uint8, g.numel() * bits // 8)
    pc, pt = _channels(c, centre=centre, c_t=c_t)
    return _sums("gk_blpa_mask_sums", lambda a, b, o1, o2: lib.gk_blpa_mask_sums(
        pg, py, pp, a, b, c, hw, pc, pt, bits, o1, o2), n, c, g.numel())


def blpa_grad_input(g: torch.Tensor, packed: torch.Tensor, centre: torch.Tensor, c_t: torch.Tensor,
                    xs: torch.Tensor, xt: torch.Tensor, m_g: torch.Tensor, m_gx: torch.Tensor, k: torch.Tensor,
                    bits: int) -> None:
    """BLPA backward step 3: ``g = (g - m_g - x̂·m_gx)·k`` in place."""
    lib = _lib_or_raise()
    n, c, hw = _planes(g, bits)
    pg = _buffer("g", g, torch.float32, g.numel())
    pp = _buffer("packed", packed, torch.uint8, g.numel() * bits // 8)
    vec = _channels(c, centre=centre, c_t=c_t, xs=xs, xt=xt, m_g=m_g, m_gx=m_gx, k=k)
    parallel(lambda a, b: _ok("gk_blpa_grad_input", lib.gk_blpa_grad_input(pg, pp, a, b, c, hw, *vec, bits)),
             n, g.numel())
