"""Fused Triton kernels for the compression path on CUDA: one launch per job, no host synchronisation.

The CPU path (``_kernels.c``, cache-blocked torch passes) launches one operation per cache block and
asks the host "any non-negative group?" per tensor; on a GPU that is hundreds of tiny kernels and a
stall per tensor. Here:

* :func:`pack`: two kernels per tensor (and a one-element fill). The first takes every group's minimum and maximum and, when
  the tensor is large enough for float16 ranges, clears a device flag (an atomic) if any group's
  ranges do not fit float16; the second reads that flag on the device, computes the ranges exactly as
  :func:`gradkit.compress._codes._ranges_from` does (float16 outward rounding included), then the
  codes (scale, noise, round, the reserved exact-zero code of non-negative groups) and packs them.
* :func:`unpack`: one launch.
* :class:`BlpaPasses` and :func:`blpa_encode`: the BLPA unit's four passes (``_blpa.py``), one launch
  each, per (sample, channel) plane.

Stochastic rounding draws its uniforms with ``tl.rand`` (Philox, counter = element index) from a seed
drawn once per tensor from torch's CPU generator, so ``torch.manual_seed`` reproduces a run. Tests pass
their own uniforms (``noise``) instead and get the reference's codes exactly.

Where the ranges are stored: the reference stores them as float16 when every group fits and the tensor
has at least ``_HALF_RANGES_MIN`` elements, else float32. Which one is a property of the data, and
choosing a dtype on the host would need a synchronisation, so this path always stores float32 tensors
that hold the very values the reference stores (float16-rounded when it would store float16). Codes
and decoded values are therefore those of the reference; ranges cost 8 bytes per group instead of 4
(int4 with groups of 256: 0.531 instead of 0.516 bytes per element).

Float arithmetic is kept in the reference's order and rounding: fp-contraction (fused multiply-add) is
disabled at launch (``enable_fp_fusion=False``), divisions are correctly rounded (``div_rn``), and
torch's ``scalar / tensor`` (reciprocal, then product) and, on CUDA, ``tensor / scalar`` (product with
the scalar's reciprocal) are mirrored.

``TRITON_INTERPRET=1`` (set before triton is imported) runs these kernels on CPU tensors: the tests
call :func:`pack`, :func:`unpack` and the BLPA functions directly that way. The normal CPU dispatch
never comes here.
"""

from __future__ import annotations

import os

import torch

from gradkit.compress._codes import _EPSILON, _HALF_RANGES_MIN, _SAFETY, Packed, _check

__all__ = ["available", "pack", "unpack", "blpa_ok", "blpa_encode", "BlpaPasses"]

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Elements one program of the generic kernels handles (several groups of up to this size).
_PROGRAM_ELEMENTS = 4096
_LAUNCH = {"enable_fp_fusion": False}


def available() -> bool:
    """Whether triton imports (the CUDA dispatch uses it then)."""
    return triton is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: CUDA ones, or any device under the interpreter."""
    return triton is not None and all(t.is_cuda or _INTERPRET for t in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _seed() -> int:
    """One draw from torch's CPU generator (no device synchronisation), < 2**31 for Philox."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


if triton is not None:

    @triton.jit
    def _half_ranges(lo, hi, levels):
        """float16 ``lo`` rounded down and ``step`` rounded up (as float32 values), and whether they fit."""
        lo16 = lo.to(tl.float16)
        lo_bits = lo16.to(tl.int16, bitcast=True)
        # nextafter(lo16, -inf): lo <= 0, so lo16 is <= 0 (or -0).
        down = tl.where((lo_bits & 0x7FFF) == 0, -32767, lo_bits + 1).to(tl.int16)
        lo16 = tl.where(lo16.to(tl.float32) > lo, down.to(tl.float16, bitcast=True), lo16)
        lo_h = lo16.to(tl.float32)
        step = tl.math.div_rn(hi - lo_h, levels)
        step16 = step.to(tl.float16)
        step_bits = step16.to(tl.int16, bitcast=True)
        up = tl.where((step_bits & 0x7FFF) == 0, 1,
                      tl.where(step_bits < 0, step_bits - 1, step_bits + 1)).to(tl.int16)
        step16 = tl.where(step16.to(tl.float32) < step, up.to(tl.float16, bitcast=True), step16)
        step_h = step16.to(tl.float32)
        # 65504: the largest finite float16 (a literal: compiled kernels cannot read Python globals)
        fits = (tl.abs(lo_h) <= 65504.0) & (tl.abs(step_h) <= 65504.0) & (
            (step_h == 0.0) | (step_h >= 0.00006103515625))
        return lo_h, step_h, fits

    # Sizes and seeds vary per tensor: no recompilation for each (only the layout is specialised).
    @triton.jit(do_not_specialize=["n", "groups"])
    def _minmax_kernel(x_ptr, n, groups, lo_ptr, hi_ptr, flag_ptr, GS: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr, LEVELS: tl.constexpr, HALF: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rvalid = rows < groups
        cols = tl.arange(0, BLOCK)
        idx = rows.to(tl.int64)[:, None] * GS + cols[None, :]
        valid = rvalid[:, None] & (cols[None, :] < GS) & (idx < n)
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(valid, x, float("inf")), axis=1)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        lo = tl.minimum(mn, 0.0)  # non-negative groups start at exactly 0
        tl.store(lo_ptr + rows, lo, mask=rvalid)
        tl.store(hi_ptr + rows, mx, mask=rvalid)
        if HALF:
            levels = tl.where(lo == 0.0, LEVELS - 1.0, LEVELS * 1.0)
            _, _, fits = _half_ranges(lo, mx, levels)
            all_fit = tl.min(tl.where(rvalid & ~fits, 0, 1), axis=0)
            tl.atomic_min(flag_ptr, all_fit)

    @triton.jit(do_not_specialize=["n", "groups", "seed"])
    def _pack_kernel(x_ptr, n, groups, lo_ptr, hi_ptr, flag_ptr, noise_ptr, seed, data_ptr, lo_out, step_out,
                     GS: tl.constexpr, BYTES_BLOCK: tl.constexpr, PER_BYTE: tl.constexpr,
                     BITS: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr, MODE: tl.constexpr,
                     SAFETY: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rvalid = rows < groups
        lo = tl.load(lo_ptr + rows, mask=rvalid, other=0.0)
        hi = tl.load(hi_ptr + rows, mask=rvalid, other=0.0)
        LEVELS: tl.constexpr = (1 << BITS) - 1
        levels = tl.where(lo == 0.0, LEVELS - 1.0, LEVELS * 1.0)
        step = tl.math.div_rn(hi - lo, levels)
        if HALF:
            lo_h, step_h, _ = _half_ranges(lo, hi, levels)
            use_half = tl.load(flag_ptr) != 0
            lo = tl.where(use_half, lo_h, lo)
            step = tl.where(use_half, step_h, step)
        tl.store(lo_out + rows, lo, mask=rvalid)
        tl.store(step_out + rows, step, mask=rvalid)
        # torch's SAFETY / step is step.reciprocal() * SAFETY; a constant group's inv is 0.
        inv = tl.where(step > 0.0, tl.math.div_rn(1.0, tl.maximum(step, 1.1754943508222875e-38)) * SAFETY, 0.0)
        nonneg = lo == 0.0
        shift = tl.where(nonneg, 1.0, 0.0)
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        BYTES: tl.constexpr = GS // PER_BYTE
        idx = rows.to(tl.int64)[:, None, None] * GS + j[None, :, None] * PER_BYTE + k[None, None, :]
        valid = rvalid[:, None, None] & (j[None, :, None] < BYTES)
        # Padding of the last group repeats the last value, as _codes._groups does.
        x = tl.load(x_ptr + tl.minimum(idx, n - 1), mask=valid, other=0.0).to(tl.float32)
        q = (x - lo[:, None, None]) * inv[:, None, None]
        q = q + shift[:, None, None]
        if MODE == 0:
            q = q + 0.5
        elif MODE == 1:
            q = q + tl.rand(seed, idx)
        else:
            q = q + tl.load(noise_ptr + idx, mask=valid, other=0.0)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
        codes = q.to(tl.int32)  # q >= 0: truncation is floor
        # Exact zeros: in a non-negative group only zeros get code 0.
        codes = tl.where(nonneg[:, None, None] & (x <= 0.0), 0, codes)
        byte = tl.sum(codes << (k * BITS)[None, None, :], axis=2)
        out = rows.to(tl.int64)[:, None] * BYTES + j[None, :]
        tl.store(data_ptr + out, byte.to(tl.uint8), mask=rvalid[:, None] & (j[None, :] < BYTES))

    @triton.jit(do_not_specialize=["n", "groups"])
    def _unpack_kernel(data_ptr, n, groups, lo_ptr, step_ptr, out_ptr, GS: tl.constexpr,
                       BYTES_BLOCK: tl.constexpr, PER_BYTE: tl.constexpr, BITS: tl.constexpr,
                       ROWS: tl.constexpr, SAFETY: tl.constexpr, EPSILON: tl.constexpr,
                       RECIPROCAL: tl.constexpr, OUT_BF16: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rvalid = rows < groups
        lo = tl.load(lo_ptr + rows, mask=rvalid, other=0.0).to(tl.float32)
        step = tl.load(step_ptr + rows, mask=rvalid, other=0.0).to(tl.float32)
        if RECIPROCAL:  # torch's tensor / scalar on CUDA: a product with the scalar's reciprocal
            step = step * (1.0 / SAFETY)
        else:
            step = tl.math.div_rn(step, SAFETY)
        nonneg = lo == 0.0
        offset = tl.where(nonneg, -(1.0 - EPSILON) * step, lo)
        floor = tl.where(nonneg, 0.0, float("-inf"))
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        BYTES: tl.constexpr = GS // PER_BYTE
        src = rows.to(tl.int64)[:, None] * BYTES + j[None, :]
        byte = tl.load(data_ptr + src, mask=rvalid[:, None] & (j[None, :] < BYTES), other=0).to(tl.int32)
        codes = (byte[:, :, None] >> (k * BITS)[None, None, :]) & ((1 << BITS) - 1)
        v = codes.to(tl.float32) * step[:, None, None]
        v = v + offset[:, None, None]
        v = tl.maximum(v, floor[:, None, None])
        idx = rows.to(tl.int64)[:, None, None] * GS + j[None, :, None] * PER_BYTE + k[None, None, :]
        valid = rvalid[:, None, None] & (j[None, :, None] < BYTES) & (idx < n)
        if OUT_BF16:
            # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates.
            b = v.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + idx, b.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=valid)
        else:
            tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=valid)


def _layout(group_size: int, bits: int) -> tuple[int, int, int]:
    """(elements per row block, bytes per row block, groups per program)."""
    block = _next_pow2(group_size)
    per_byte = 8 // bits
    rows = max(1, _PROGRAM_ELEMENTS // block)
    return block, block // per_byte, rows


def pack(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int = 256,
    rounding: str = "stochastic",
    noise: torch.Tensor | None = None,
    seed: int | None = None,
) -> Packed:
    """:func:`gradkit.compress._quant.pack_reference`'s codes in two fused launches (see the module).

    ``noise``: uniforms, one per element of the padded groups (the reference's argument); without it,
    stochastic rounding draws Philox uniforms from ``seed`` (drawn from torch's generator when None).
    """
    _check(bits, group_size, rounding)
    if triton is None:
        raise RuntimeError(f"triton is not available ({_IMPORT_ERROR})")
    x = x.detach()
    shape, dtype = x.shape, x.dtype  # decoded back to these
    if not x.is_contiguous():
        x = x.contiguous()
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    n = x.numel()
    groups = -(-n // group_size)
    device = x.device
    per_byte = 8 // bits
    block, bytes_block, rows = _layout(group_size, bits)
    grid = (triton.cdiv(groups, rows),)
    half = groups * group_size >= _HALF_RANGES_MIN
    lo_raw = torch.empty(groups, 1, device=device)
    hi_raw = torch.empty(groups, 1, device=device)
    flag = torch.ones(1, dtype=torch.int32, device=device)
    levels = 2**bits - 1
    _minmax_kernel[grid](x, n, groups, lo_raw, hi_raw, flag, GS=group_size, BLOCK=block, ROWS=rows,
                         LEVELS=levels, HALF=half, **_LAUNCH)
    if rounding == "nearest":
        mode, noise_arg, seed_arg = 0, lo_raw, 0
    elif noise is not None:
        noise_arg = noise.detach().to(device=device, dtype=torch.float32).contiguous()
        if noise_arg.numel() != groups * group_size:
            raise ValueError(f"noise needs {groups * group_size} values, got {noise_arg.numel()}")
        mode, seed_arg = 2, 0
    else:
        mode, noise_arg, seed_arg = 1, lo_raw, _seed() if seed is None else seed
    data = torch.empty(groups, group_size // per_byte, dtype=torch.uint8, device=device)
    lo = torch.empty(groups, 1, device=device)
    step = torch.empty(groups, 1, device=device)
    _pack_kernel[grid](x, n, groups, lo_raw, hi_raw, flag, noise_arg, seed_arg, data, lo, step,
                       GS=group_size, BYTES_BLOCK=bytes_block, PER_BYTE=per_byte, BITS=bits, ROWS=rows,
                       HALF=half, MODE=mode, SAFETY=_SAFETY, **_LAUNCH)
    return Packed(data, lo, step, shape, dtype, bits)


def unpack(packed: Packed, *, reciprocal: bool | None = None) -> torch.Tensor:
    """Decode ``packed`` in one launch: ``max(code·step + offset, floor)`` as the reference does.

    ``reciprocal``: divide the stored step by ``_SAFETY`` as torch does on CUDA (a product with the
    reciprocal) rather than on the CPU (a division); by default as on the packed tensor's device.
    """
    if triton is None:
        raise RuntimeError(f"triton is not available ({_IMPORT_ERROR})")
    data = packed.data
    bits = packed.bits
    group_size = data.shape[1] * 8 // bits
    groups = data.shape[0]
    block, bytes_block, rows = _layout(group_size, bits)
    out = torch.empty(packed.shape, dtype=packed.dtype, device=data.device)
    _unpack_kernel[(triton.cdiv(groups, rows),)](
        data, packed.shape.numel(), groups, packed.lo, packed.step, out, GS=group_size,
        BYTES_BLOCK=bytes_block, PER_BYTE=8 // bits, BITS=bits, ROWS=rows, SAFETY=_SAFETY,
        EPSILON=_EPSILON, RECIPROCAL=data.is_cuda if reciprocal is None else reciprocal,
        OUT_BF16=packed.dtype == torch.bfloat16, **_LAUNCH)
    return out



# -- BLPA (BatchNorm -> ReLU -> Conv, _blpa.py): one program per (sample, channel) plane ----------------
if triton is not None:

    @triton.jit
    def _blpa_values(byte, k, centre, ct, BITS: tl.constexpr):
        """Codes and v (bin centre relative to the threshold, in bins) of a block of packed bytes, with
        the reserved end codes of channels whose threshold lies outside the window (_blpa)."""
        LEVELS: tl.constexpr = (1 << BITS) - 1
        codes = (byte[:, None] >> (k * BITS)[None, :]) & LEVELS
        v = codes.to(tl.float32) - centre
        # (nested where: the interpreter cannot `&` a scalar condition with a block)
        v = tl.where(ct < 1.0, tl.where(codes == 0, -0.5, v), v)
        v = tl.where(ct > LEVELS * 1.0, tl.where(codes == LEVELS, 0.5, v), v)
        return v

    @triton.jit(do_not_specialize=["C"])
    def _blpa_encode_kernel(x_ptr, a_ptr, b_ptr, sy_ptr, hy_ptr, off_ptr, ct_ptr, y_ptr, data_ptr, C, HW,
                            BITS: tl.constexpr, PER_BYTE: tl.constexpr, BYTES_BLOCK: tl.constexpr):
        plane = tl.program_id(0)
        c = plane % C
        a = tl.load(a_ptr + c)
        b = tl.load(b_ptr + c)
        sy = tl.load(sy_ptr + c)
        hy = tl.load(hy_ptr + c)
        off = tl.load(off_ptr + c)
        ct = tl.load(ct_ptr + c)
        LEVELS: tl.constexpr = (1 << BITS) - 1
        low = ct < 1.0
        high = ct > LEVELS * 1.0
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        base = plane.to(tl.int64) * HW
        for i0 in range(0, HW, BYTES_BLOCK * PER_BYTE):
            i = i0 + j[:, None] * PER_BYTE + k[None, :]
            valid = i < HW
            x = tl.load(x_ptr + base + i, mask=valid, other=0.0)
            v = tl.fma(x, a, b)
            t = tl.fma(v, sy, hy)
            tl.store(y_ptr + base + i, tl.where(t > 0.0, t, 0.0), mask=valid)
            kk = tl.minimum(tl.maximum(tl.math.ceil(v) + off, 0.0), LEVELS * 1.0)
            code = kk.to(tl.int32)
            code = tl.where(low, tl.where(v > 0.0, tl.maximum(code, 1), 0), code)
            code = tl.where(high, tl.where(v > 0.0, LEVELS, tl.minimum(code, LEVELS - 1)), code)
            byte = tl.sum(code << (k * BITS)[None, :], axis=1)
            jb = i0 // PER_BYTE + j
            tl.store(data_ptr + base // PER_BYTE + jb, byte.to(tl.uint8), mask=jb < HW // PER_BYTE)

    @triton.jit(do_not_specialize=["C"])
    def _blpa_decode_kernel(data_ptr, centre_ptr, ct_ptr, sy_ptr, hy_ptr, y_ptr, C, HW, BITS: tl.constexpr,
                            PER_BYTE: tl.constexpr, BYTES_BLOCK: tl.constexpr):
        plane = tl.program_id(0)
        c = plane % C
        centre = tl.load(centre_ptr + c)
        ct = tl.load(ct_ptr + c)
        sy = tl.load(sy_ptr + c)
        hy = tl.load(hy_ptr + c)
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        base = plane.to(tl.int64) * HW
        for i0 in range(0, HW, BYTES_BLOCK * PER_BYTE):
            jb = i0 // PER_BYTE + j
            byte = tl.load(data_ptr + base // PER_BYTE + jb, mask=jb < HW // PER_BYTE, other=0).to(tl.int32)
            v = _blpa_values(byte, k, centre, ct, BITS)
            t = tl.fma(v, sy, hy)
            i = i0 + j[:, None] * PER_BYTE + k[None, :]
            tl.store(y_ptr + base + i, tl.where(t > 0.0, t, 0.0), mask=i < HW)

    @triton.jit(do_not_specialize=["C"])
    def _blpa_mask_sums_kernel(g_ptr, y_ptr, data_ptr, centre_ptr, ct_ptr, sums_ptr, C, HW, BITS: tl.constexpr,
                               PER_BYTE: tl.constexpr, BYTES_BLOCK: tl.constexpr):
        plane = tl.program_id(0)
        c = plane % C
        centre = tl.load(centre_ptr + c)
        ct = tl.load(ct_ptr + c)
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        base = plane.to(tl.int64) * HW
        acc_g = tl.zeros((BYTES_BLOCK, PER_BYTE), dtype=tl.float64)
        acc_gv = tl.zeros((BYTES_BLOCK, PER_BYTE), dtype=tl.float64)
        for i0 in range(0, HW, BYTES_BLOCK * PER_BYTE):
            jb = i0 // PER_BYTE + j
            byte = tl.load(data_ptr + base // PER_BYTE + jb, mask=jb < HW // PER_BYTE, other=0).to(tl.int32)
            v = _blpa_values(byte, k, centre, ct, BITS)
            i = i0 + j[:, None] * PER_BYTE + k[None, :]
            valid = i < HW
            g = tl.load(g_ptr + base + i, mask=valid, other=0.0)
            y = tl.load(y_ptr + base + i, mask=valid, other=0.0)
            gz = tl.where(y > 0.0, g, 0.0)
            tl.store(g_ptr + base + i, gz, mask=valid)
            acc_g += gz.to(tl.float64)
            acc_gv += (gz * v).to(tl.float64)
        tl.store(sums_ptr + plane * 2, tl.sum(tl.sum(acc_g, axis=1), axis=0))
        tl.store(sums_ptr + plane * 2 + 1, tl.sum(tl.sum(acc_gv, axis=1), axis=0))

    @triton.jit(do_not_specialize=["C"])
    def _blpa_grad_input_kernel(g_ptr, data_ptr, centre_ptr, ct_ptr, xs_ptr, xt_ptr, mg_ptr, mgx_ptr, k_ptr, C,
                                HW, BITS: tl.constexpr, PER_BYTE: tl.constexpr, BYTES_BLOCK: tl.constexpr):
        plane = tl.program_id(0)
        c = plane % C
        centre = tl.load(centre_ptr + c)
        ct = tl.load(ct_ptr + c)
        s = tl.load(xs_ptr + c)
        t = tl.load(xt_ptr + c)
        mg = tl.load(mg_ptr + c)
        mgx = tl.load(mgx_ptr + c)
        kk = tl.load(k_ptr + c)
        j = tl.arange(0, BYTES_BLOCK)
        k = tl.arange(0, PER_BYTE)
        base = plane.to(tl.int64) * HW
        for i0 in range(0, HW, BYTES_BLOCK * PER_BYTE):
            jb = i0 // PER_BYTE + j
            byte = tl.load(data_ptr + base // PER_BYTE + jb, mask=jb < HW // PER_BYTE, other=0).to(tl.int32)
            v = _blpa_values(byte, k, centre, ct, BITS)
            i = i0 + j[:, None] * PER_BYTE + k[None, :]
            valid = i < HW
            g = tl.load(g_ptr + base + i, mask=valid, other=0.0)
            xhat = tl.fma(v, s, t)
            g = (g - mg) - xhat * mgx
            tl.store(g_ptr + base + i, g * kk, mask=valid)


# Elements per chunk of a plane in the BLPA kernels.
_BLPA_CHUNK = 1024


def blpa_ok(x: torch.Tensor, bits: int) -> bool:
    """Whether the Triton BLPA passes can run this unit: float32 NCHW on CUDA (or the interpreter),
    whole bytes per (sample, channel) plane."""
    return (usable(x) and x.dtype == torch.float32 and x.dim() == 4
            and (x.shape[2] * x.shape[3] * bits) % 8 == 0)


def _blpa_layout(hw: int, bits: int) -> tuple[int, int]:
    per_byte = 8 // bits
    chunk = min(_BLPA_CHUNK, _next_pow2(hw))
    return per_byte, max(1, chunk // per_byte)


def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).float().contiguous()


def blpa_encode(
    x: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor, scale_y: torch.Tensor, shift_y: torch.Tensor,
    offset: torch.Tensor, c_t: torch.Tensor, bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv input ``y`` and the packed codes of one unit, in one launch (``gk_blpa_encode``)."""
    assert triton is not None
    x = x.contiguous()
    n, c, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    per_byte, bytes_block = _blpa_layout(hw, bits)
    y = torch.empty_like(x)
    data = torch.empty(1, x.numel() * bits // 8, dtype=torch.uint8, device=x.device)
    _blpa_encode_kernel[(n * c,)](x, *(_vec(t) for t in (a_v, b_v, scale_y, shift_y, offset, c_t)), y, data, c,
                                  hw, BITS=bits, PER_BYTE=per_byte, BYTES_BLOCK=bytes_block, **_LAUNCH)
    return y, data


class BlpaPasses:
    """The backward passes of one BLPA unit, one launch each (as ``_blpa._NativeBackward``): v is
    re-read from the packed codes every time instead of being held as a float tensor."""

    def __init__(self, data: torch.Tensor, shape: torch.Size, centre: torch.Tensor, c_t: torch.Tensor,
                 bits: int) -> None:
        self.data, self.shape, self.bits = data, shape, bits
        self.centre, self.c_t = _vec(centre), _vec(c_t)
        self.c, self.hw = shape[1], shape[2] * shape[3]
        self.planes = shape[0] * shape[1]
        self.per_byte, self.bytes_block = _blpa_layout(self.hw, bits)

    def _meta(self) -> dict[str, int | bool]:
        return {"BITS": self.bits, "PER_BYTE": self.per_byte, "BYTES_BLOCK": self.bytes_block, **_LAUNCH}

    def decode(self, scale_y: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
        """The conv input ``y`` from the codes."""
        y = torch.empty(self.shape, device=self.data.device)
        _blpa_decode_kernel[(self.planes,)](self.data, self.centre, self.c_t, _vec(scale_y), _vec(shift_y), y,
                                            self.c, self.hw, **self._meta())
        return y

    def mask_sums(self, grad_y: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """Applies the ReLU mask to ``grad_y`` in place; returns per-channel Σ g and Σ g·v (float64
        accumulation per plane, then over samples)."""
        sums = torch.empty(self.shape[0], self.c, 2, dtype=torch.float64, device=grad_y.device)
        _blpa_mask_sums_kernel[(self.planes,)](grad_y, y, self.data, self.centre, self.c_t, sums, self.c,
                                               self.hw, **self._meta())
        total = sums.sum(0).to(dtype)
        return total[:, 0], total[:, 1]

    def grad_input(self, g: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, m_g: torch.Tensor,
                   m_gx: torch.Tensor, k: torch.Tensor) -> None:
        """The BatchNorm input gradient ``(g - m_g - x̂·m_gx)·k``, in place on ``g``."""
        _blpa_grad_input_kernel[(self.planes,)](g, self.data, self.centre, self.c_t,
                                                *(_vec(t) for t in (xs, xt, m_g, m_gx, k)), self.c, self.hw,
                                                **self._meta())
