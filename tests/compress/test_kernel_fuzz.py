"""Bounded fuzzing of the fused C kernels against the torch reference, and their refusal of bad sizes.

Random shapes (empty, tiny, not a multiple of the group), group sizes (8 to the maximum), bit widths,
dtypes and layouts (transposed, sliced) go through :func:`pack` / :func:`unpack` on both paths and must
give the reference's codes for the same noise, bit for bit. Every C entry point is also called directly,
bypassing the Python checks, with sizes it must refuse: it has to return its error code without
touching memory. ``test_kernel_asan.py`` runs this file against an AddressSanitizer build, where any
out-of-bounds access aborts the run. Seeds are fixed: a failure names a reproducible case.
"""

from __future__ import annotations

import ctypes
import random
import time
from typing import Any

import pytest
import torch

from gradkit.compress import (
    MAX_GROUP_SIZE,
    _blpa,
    _native,
    pack,
    pack_reference,
    unpack,
    unpack_reference,
)
from gradkit.compress._quant import Packed

# The C file's GK_E* error codes.
EBITS, EGROUP, ECOUNT, ERANGE, EMODE, ENULL, ELAYOUT = -2, -3, -4, -5, -6, -7, -8

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "transposed", "sliced")


def _values(rng: random.Random, gen: torch.Generator, n: int) -> torch.Tensor:
    kind = rng.choice(("randn", "relu", "constant", "zeros", "huge", "tiny", "shifted"))
    x = torch.randn(n, generator=gen)
    if kind == "relu":
        return x.relu()
    if kind == "constant":
        return torch.full((n,), rng.uniform(-3, 3))
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "huge":
        return x * 1e6
    if kind == "tiny":
        return x * 1e-7
    if kind == "shifted":
        return x + 100.0
    return x


def _tensor(rng: random.Random, gen: torch.Generator, numel_max: int) -> torch.Tensor:
    """A float tensor with a random size, dtype and layout (non-contiguous for transposed/sliced)."""
    n = rng.choice((0, 1, 7, rng.randint(2, 64), rng.randint(65, numel_max)))
    layout = rng.choice(LAYOUTS)
    dtype = rng.choice(DTYPES)
    if layout == "transposed" and n > 1:
        rows = rng.randint(1, max(1, n // 2))
        cols = max(1, n // rows)
        x = _values(rng, gen, rows * cols).view(cols, rows).t()
    elif layout == "sliced":
        x = _values(rng, gen, 2 * n)[::2]
    else:
        x = _values(rng, gen, n)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # finite in float16
    return x.to(dtype)


def _group_size(rng: random.Random) -> int:
    return rng.choice((8, 16, 24, 256, MAX_GROUP_SIZE, MAX_GROUP_SIZE - 8, 8 * rng.randint(1, MAX_GROUP_SIZE // 8)))


def _same_packed(a: Packed, b: Packed) -> bool:
    return (torch.equal(a.data, b.data) and a.lo.dtype == b.lo.dtype and torch.equal(a.lo, b.lo)
            and torch.equal(a.step, b.step) and a.shape == b.shape and a.dtype == b.dtype)


@pytest.mark.parametrize("seed", range(6))
def test_pack_and_unpack_match_the_reference(seed: int, kernels: str) -> None:
    """Same codes, ranges and decoded values as the reference for the same noise (and for nearest
    rounding), on random shapes, group sizes, bit widths, dtypes and layouts."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for case in range(12):
        x = _tensor(rng, gen, 20_000)
        bits, group_size = rng.choice((2, 4, 8)), _group_size(rng)
        where = f"seed {seed} case {case}: shape {tuple(x.shape)} {x.dtype} contiguous={x.is_contiguous()} " \
                f"bits {bits} group {group_size}"
        padded = -(-x.numel() // group_size) * group_size
        noise = torch.rand(padded, generator=gen)
        fast = pack(x, bits, group_size=group_size, noise=noise)
        ref = pack_reference(x, bits, group_size=group_size, noise=noise)
        assert _same_packed(fast, ref), where
        # Only float32 contiguous CPU tensors run on the C kernels; unpack follows the path that packed.
        assert fast.native == (kernels == "native" and x.dtype == torch.float32 and x.is_contiguous()), where
        out = unpack(fast)
        assert out.dtype == x.dtype and out.shape == x.shape, where
        assert torch.equal(out, unpack_reference(ref)), where
        near = pack(x, bits, group_size=group_size, rounding="nearest")
        assert _same_packed(near, pack_reference(x, bits, group_size=group_size, rounding="nearest")), where
        # Self-seeded stochastic rounding: no reference codes, but the decode stays within one step.
        torch.manual_seed(seed)
        rand = pack(x, bits, group_size=group_size)
        err = (unpack(rand).double() - x.double()).abs().reshape(-1)
        step = rand.step.double().repeat_interleave(group_size)[: x.numel()]
        assert bool((err <= step * 1.01 + x.double().abs().reshape(-1) * 1e-2).all()), where


@pytest.mark.usefixtures("kernels")
def test_threaded_split_matches_the_reference() -> None:
    """A tensor large enough to be split across two threads, with a partial last group."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(300_007, generator=gen)
    noise = torch.rand(-(-x.numel() // 4096) * 4096, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = pack(x, 4, group_size=4096, noise=noise)
        out = unpack(fast)
    finally:
        torch.set_num_threads(threads)
    ref = pack_reference(x, 4, group_size=4096, noise=noise)
    assert _same_packed(fast, ref) and torch.equal(out, unpack_reference(ref))


@pytest.mark.parametrize("group_size", [MAX_GROUP_SIZE + 8, 8192, 2 * MAX_GROUP_SIZE + 8, 0, -8, 12, 4])
def test_bad_group_sizes_are_refused_on_every_path(group_size: int, kernels: str) -> None:
    x = torch.randn(10_000)
    for fn in (pack, pack_reference):
        with pytest.raises(ValueError, match="group_size"):
            fn(x, 4, group_size=group_size)


def test_wrong_noise_length_is_refused(kernels: str) -> None:
    x = torch.randn(1000)
    for n in (999, 1000 + 255, 0):
        with pytest.raises(ValueError, match="noise"):
            pack(x, 4, group_size=256, noise=torch.rand(n))


@pytest.mark.usefixtures("native")
def test_unpack_of_oversized_or_inconsistent_packed_data_raises_cleanly() -> None:
    """Codes from elsewhere claiming the native path: groups wider than the kernels hold, or fewer groups
    than the shape needs, raise instead of reading or writing out of bounds."""
    x = torch.randn(8192)
    wide = pack_reference(x, 4, group_size=4096)
    wide = Packed(wide.data.reshape(1, -1), wide.lo[:1], wide.step[:1], x.shape, x.dtype, 4, native=True)
    with pytest.raises(ValueError, match="group size"):
        unpack(wide)
    wide.native = False  # the torch path handles any width
    assert unpack(wide).shape == x.shape
    short = pack(x, 4, group_size=256)
    short = Packed(short.data[:3], short.lo[:3], short.step[:3], x.shape, x.dtype, 4, native=True)
    with pytest.raises(ValueError, match="do not hold"):
        unpack(short)


@pytest.mark.usefixtures("native")
def test_checked_wrappers_refuse_short_or_wrong_buffers() -> None:
    x = torch.randn(1000)
    lo, hi = torch.empty(4), torch.empty(4)
    _native.minmax(x, 256, lo, hi)
    with pytest.raises(_native.KernelError, match="holds 3 elements"):
        _native.minmax(x, 256, torch.empty(3), hi)
    with pytest.raises(_native.KernelError, match="float32"):
        _native.minmax(x.double(), 256, lo, hi)
    with pytest.raises(_native.KernelError, match="contiguous"):
        _native.minmax(torch.randn(40, 50).t(), 256, torch.empty(8), torch.empty(8))
    with pytest.raises(_native.KernelError, match="group size"):
        _native.minmax(x, 8192, lo, hi)
    inv, out = torch.ones(4), torch.empty(4, 128, dtype=torch.uint8)
    with pytest.raises(_native.KernelError, match="noise holds"):
        _native.pack(x, 256, lo, inv, 4, 2, 0, torch.rand(1000), out)
    with pytest.raises(_native.KernelError, match="out holds"):
        _native.pack(x, 256, lo, inv, 4, 0, 0, None, out[:3])
    with pytest.raises(_native.KernelError, match="bits"):
        _native.pack(x, 256, lo, inv, 3, 0, 0, None, out)
    with pytest.raises(_native.KernelError, match="mode"):
        _native.pack(x, 256, lo, inv, 4, 2, 0, None, out)
    terms = [torch.ones(4) for _ in range(3)]
    with pytest.raises(_native.KernelError, match="data holds"):
        _native.unpack(out[:3], 1000, 256, 4, *terms, torch.empty(1000))
    with pytest.raises(_native.KernelError, match="out holds"):
        _native.unpack(out, 1000, 256, 4, *terms, torch.empty(999))
    y4 = torch.randn(2, 3, 3, 3)
    with pytest.raises(_native.KernelError, match="multiple of 8"):
        _native.blpa_decode(torch.empty(100, dtype=torch.uint8), y4, *[torch.ones(3)] * 4, 4)
    with pytest.raises(_native.KernelError, match="c_t holds"):
        _native.blpa_decode(torch.empty(100, dtype=torch.uint8), torch.empty(2, 3, 4, 4),
                            torch.ones(3), torch.ones(2), torch.ones(3), torch.ones(3), 4)


def _raw_calls(lib: Any) -> tuple[list[tuple[str, int, Any]], list[torch.Tensor]]:
    """Direct calls of each C entry point with properly sized buffers but scalars it must refuse; each
    is (what, expected error code, thunk). Without the C checks, the group-size cases write past the
    kernels' stack arrays (what AddressSanitizer reports), the others read or write out of range.
    Also returns the buffers, which the caller must keep alive while it calls."""
    big = 2 * 8192
    x = torch.randn(big)
    f = [torch.zeros(big) for _ in range(8)]
    out = torch.zeros(big, dtype=torch.uint8)
    p = [t.data_ptr() for t in f]
    px, po = x.data_ptr(), out.data_ptr()
    calls: list[tuple[str, int, Any]] = []
    for gs in (MAX_GROUP_SIZE + 8, 8192, 0, 12, -8):
        calls += [
            (f"unpack gs={gs}", EGROUP, lambda gs=gs: lib.gk_unpack(po, 8192, gs, 0, 1, 8, p[0], p[1], p[2], p[3])),
            (f"pack gs={gs}", EGROUP, lambda gs=gs: lib.gk_pack(px, 8192, gs, 0, 1, p[0], p[1], 8, 2, 0, p[2], po)),
            (f"minmax gs={gs}", EGROUP, lambda gs=gs: lib.gk_minmax(px, 8192, gs, 0, 1, p[0], p[1])),
        ]
    for bits in (0, 1, 3, 16, -4):
        calls += [
            (f"ranges bits={bits}", EBITS,
             lambda b=bits: lib.gk_ranges(p[0], p[1], 4, b, 1, 1.0, p[2], p[3], p[4], p[5], p[6])),
            (f"pack bits={bits}", EBITS, lambda b=bits: lib.gk_pack(px, 256, 256, 0, 1, p[0], p[1], b, 0, 0, None, po)),
            (f"unpack bits={bits}", EBITS, lambda b=bits: lib.gk_unpack(po, 256, 256, 0, 1, b, p[0], p[1], p[2], p[3])),
            (f"encode bits={bits}", EBITS, lambda b=bits: lib.gk_blpa_encode(px, 0, 1, 2, 64, *p[:6], b, p[6], po)),
            (f"decode bits={bits}", EBITS, lambda b=bits: lib.gk_blpa_decode(po, 0, 1, 2, 64, *p[:4], b, p[4])),
            (f"mask_sums bits={bits}", EBITS,
             lambda b=bits: lib.gk_blpa_mask_sums(p[0], p[1], po, 0, 1, 2, 64, p[2], p[3], b, p[4], p[5])),
            (f"grad_input bits={bits}", EBITS,
             lambda b=bits: lib.gk_blpa_grad_input(p[0], po, 0, 1, 2, 64, *p[1:8], b)),
        ]
    calls += [
        ("minmax n<0", ECOUNT, lambda: lib.gk_minmax(px, -1, 256, 0, 0, p[0], p[1])),
        ("minmax n huge", ECOUNT, lambda: lib.gk_minmax(px, 2**63 - 1, 256, 0, 1, p[0], p[1])),
        ("minmax end past groups", ERANGE, lambda: lib.gk_minmax(px, 1000, 256, 0, 5, p[0], p[1])),
        ("minmax begin<0", ERANGE, lambda: lib.gk_minmax(px, 1000, 256, -1, 2, p[0], p[1])),
        ("minmax end<begin", ERANGE, lambda: lib.gk_minmax(px, 1000, 256, 3, 2, p[0], p[1])),
        ("minmax NULL", ENULL, lambda: lib.gk_minmax(None, 1000, 256, 0, 1, p[0], p[1])),
        ("ranges groups<0", ECOUNT, lambda: lib.gk_ranges(p[0], p[1], -1, 4, 1, 1.0, p[2], p[3], p[4], p[5], p[6])),
        ("pack end past groups", ERANGE, lambda: lib.gk_pack(px, 1000, 256, 0, 5, p[0], p[1], 4, 0, 0, None, po)),
        ("pack mode 3", EMODE, lambda: lib.gk_pack(px, 1000, 256, 0, 1, p[0], p[1], 4, 3, 0, None, po)),
        ("pack mode 2 without noise", EMODE, lambda: lib.gk_pack(px, 1000, 256, 0, 1, p[0], p[1], 4, 2, 0, None, po)),
        ("pack NULL out", ENULL, lambda: lib.gk_pack(px, 1000, 256, 0, 1, p[0], p[1], 4, 0, 0, None, None)),
        ("unpack end past groups", ERANGE, lambda: lib.gk_unpack(po, 1000, 256, 0, 5, 4, p[0], p[1], p[2], p[3])),
        ("unpack n<0", ECOUNT, lambda: lib.gk_unpack(po, -5, 256, 0, 0, 4, p[0], p[1], p[2], p[3])),
        ("moments c<0", ECOUNT, lambda: lib.gk_moments(px, 0, 1, -2, 64, p[0], p[1], p[2])),
        ("moments end<begin", ERANGE, lambda: lib.gk_moments(px, 2, 1, 2, 64, p[0], p[1], p[2])),
        ("moments overflow", ECOUNT, lambda: lib.gk_moments(px, 0, 2**40, 2**20, 2**20, p[0], p[1], p[2])),
        ("encode odd plane", ELAYOUT, lambda: lib.gk_blpa_encode(px, 0, 1, 2, 9, *p[:6], 4, p[6], po)),
        ("decode odd plane", ELAYOUT, lambda: lib.gk_blpa_decode(po, 0, 1, 2, 6, *p[:4], 2, p[4])),
        ("mask_sums hw<0", ECOUNT, lambda: lib.gk_blpa_mask_sums(p[0], p[1], po, 0, 1, 2, -64, p[2], p[3], 8, p[4], p[5])),
        ("grad_input begin<0", ERANGE, lambda: lib.gk_blpa_grad_input(p[0], po, -1, 1, 2, 64, *p[1:8], 8)),
        ("encode NULL", ENULL, lambda: lib.gk_blpa_encode(None, 0, 1, 2, 64, *p[:6], 8, p[6], po)),
    ]
    return calls, [x, out, *f]


@pytest.mark.usefixtures("native")
def test_every_entry_point_refuses_bad_scalars_without_touching_memory() -> None:
    lib = _native.kernels()
    assert lib.gk_max_group() == MAX_GROUP_SIZE
    calls, buffers = _raw_calls(lib)
    for what, code, call in calls:
        assert call() == code, what
    del buffers
    # The same refusals through the checked wrappers' error path: a clear exception.
    with pytest.raises(_native.KernelError, match="group size"):
        _native._ok("gk_unpack", EGROUP)


@pytest.mark.usefixtures("native")
def test_valid_raw_calls_at_the_maximum_group_size() -> None:
    """The largest group the kernels hold, one full and one partial group, through the raw entry points."""
    lib = _native.kernels()
    n, gs = MAX_GROUP_SIZE + 100, MAX_GROUP_SIZE
    x = torch.randn(n)
    lo, hi, inv = torch.empty(2), torch.empty(2), torch.ones(2)
    assert lib.gk_minmax(x.data_ptr(), n, gs, 0, 2, lo.data_ptr(), hi.data_ptr()) == 0
    out = torch.empty(2 * gs, dtype=torch.uint8)
    assert lib.gk_pack(x.data_ptr(), n, gs, 0, 2, lo.data_ptr(), inv.data_ptr(), 8, 1, 1, None, out.data_ptr()) == 0
    dec = torch.empty(n)
    assert lib.gk_unpack(out.data_ptr(), n, gs, 0, 2, 8, inv.data_ptr(), lo.data_ptr(), lo.data_ptr(),
                         dec.data_ptr()) == 0


def _blpa_case(rng: random.Random, gen: torch.Generator, bits: int) -> tuple[torch.Tensor, ...]:
    n, c = rng.choice((0, 1, 2, 3)), rng.randint(1, 5)
    h, w = rng.choice(((1, 8), (3, 8), (4, 4), (2, 6), (66, 64), (7, 8)))
    levels, s = 2**bits - 1, _blpa._WINDOW / 2**bits
    shape = (1, c, 1, 1)
    a_v = (torch.randn(c, generator=gen) / s).view(shape)
    b_v = (torch.randn(c, generator=gen) * 3).view(shape)
    scale_y, shift_y = torch.rand(c, generator=gen).view(shape), torch.zeros(shape)
    c_t = torch.tensor([rng.choice((0.0, 1.0, 2.0, float(levels), levels + 1.0, -1.0, levels + 3.0))
                        for _ in range(c)])
    offset = (c_t - 1).view(shape)
    x = torch.randn(n, c, h, w, generator=gen) * 3
    return x, a_v, b_v, scale_y, shift_y, offset, c_t


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blpa_kernels_match_their_torch_passes(bits: int) -> None:
    """Encode bit for bit; decode and the ReLU mask bit for bit; the sums and the input gradient up to
    summation order. Planes larger than the kernels' chunk (66x64 > 4096) and empty batches included."""
    rng = random.Random(bits)
    gen = torch.Generator().manual_seed(bits)
    for case in range(8):
        x, a_v, b_v, scale_y, shift_y, offset, c_t = _blpa_case(rng, gen, bits)
        where = f"bits {bits} case {case}: shape {tuple(x.shape)}"
        if (x.shape[2] * x.shape[3] * bits) % 8:
            assert not _blpa._native_ok(x, bits), where  # such planes go to torch
            continue
        y_n, data_n = _blpa._native_encode(x, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
        y_t, data_t, packed_bits = _blpa._torch_encode(x, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
        assert packed_bits == bits and torch.equal(y_n, y_t) and torch.equal(data_n, data_t), where
        centre = c_t - 0.5
        nat = _blpa._NativeBackward(data_n, x.shape, centre, c_t, bits)
        ref = _blpa._TorchBackward(data_t, packed_bits, x.shape, centre, c_t, bits)
        yd_n, yd_t = nat.decode(scale_y, shift_y), ref.decode(scale_y, shift_y)
        assert torch.equal(yd_n, yd_t), where
        g = torch.randn(x.shape, generator=gen)
        g_n, g_t = g.clone(), g.clone()
        sums_n, sums_t = nat.mask_sums(g_n, yd_n, torch.float32), ref.mask_sums(g_t, yd_t, torch.float32)
        assert torch.equal(g_n, g_t), where
        for a, b in zip(sums_n, sums_t, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=where)
        vec = [torch.randn(1, x.shape[1], 1, 1, generator=gen) for _ in range(5)]
        nat.grad_input(g_n, *vec)
        ref.grad_input(g_t, *vec)
        torch.testing.assert_close(g_n, g_t, rtol=1e-5, atol=1e-5, msg=where)
        if x.shape[0]:
            shift = x[0].mean(dim=(1, 2)).contiguous()
            s1, s2 = _native.moments(x, shift)
            d = x - shift.view(1, -1, 1, 1)
            torch.testing.assert_close(s1, d.double().sum(dim=(0, 2, 3)), rtol=1e-9, atol=1e-6, msg=where)
            torch.testing.assert_close(s2, d.double().square().sum(dim=(0, 2, 3)), rtol=1e-9, atol=1e-6,
                                       msg=where)


@pytest.mark.usefixtures("native")
def test_blpa_unit_on_non_contiguous_or_other_dtypes_runs_on_torch() -> None:
    """Inputs the kernels cannot read in place (channels-last, float64) take the torch passes."""
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    assert not _blpa._native_ok(x) and not _blpa._native_ok(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    bn, conv = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 3, padding=1)
    out = _blpa.bn_relu_conv(x.requires_grad_(), bn, conv, 4)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.fixture
def native() -> None:
    if _native.kernels() is None:
        pytest.skip("no C compiler here: the fused kernels cannot be built")


def test_ctypes_signatures_cover_every_entry_point() -> None:
    """Every exported gk_ function has argument types (ctypes would otherwise pass ints as C int)."""
    if _native.kernels() is None:
        pytest.skip("no C compiler here")
    lib = _native.kernels()
    for name in _native._SIGNATURES:
        fn = getattr(lib, name)
        assert fn.restype is ctypes.c_int and fn.argtypes is not None, name


def test_parallel_waits_for_every_worker_before_raising() -> None:
    """An error in one chunk must not hand the buffers back while another chunk still writes to them."""
    finished: list[int] = []

    def work(a: int, b: int) -> None:
        if a == 0:
            raise _native.KernelError("refused")
        time.sleep(0.2)
        finished.append(a)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(_native.KernelError):
            _native.parallel(work, 2, 1 << 20)
    finally:
        torch.set_num_threads(threads)
    assert finished == [1]
