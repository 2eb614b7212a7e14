"""Per-group uniform quantisation of a tensor into packed 2/4/8-bit codes, and back.

The generic path's quantiser, after ActNN (Chen et al., ICML 2021) and GACT (Liu et al., ICML 2022):
the flattened tensor is cut into groups of ``group_size`` elements; each group keeps its own range
``[lo, lo + L*step]`` (``L = 2**bits - 1``) and its elements become integer codes in ``0..L``, rounded
stochastically (unbiased: ``E[decode] = x``) or to the nearest level. Codes are packed 8/bits per byte.

Groups whose minimum is >= 0 (ReLU outputs, softmax, masks) reserve code 0 for exact zeros, and their
positive elements take codes ``1..L`` on the grid ``(c - 1 + ε)·step`` with ``step = max / (L - 1)``
(``ε = 2**-10``): ``decoded > 0`` equals ``x > 0``, so a ReLU's backward mask read from the decoded
tensor is bit-exact (the pitfall ActNN/GACT users hit: naive rounding zeroes 7.5% of positive units at
4 bits, 35% at 2 bits), and stochastic rounding of positives stays unbiased up to ``ε·step``. (Rounding
small positives up to a first level of one step instead, as an earlier version did, biased every conv
weight gradient of a ResNet by ~2%.) The price is one level fewer for the positives.

Decoding is ``max(code·step + offset, floor)`` per group: ``offset = lo``, ``floor = -inf`` for signed
groups; ``offset = -(1 - ε)·step``, ``floor = 0`` for non-negative ones.

Three implementations compute the same codes: :func:`pack_reference` / :func:`unpack_reference`, written
for clarity (one code per byte position), and :func:`pack` / :func:`unpack`, which run the fused C
kernels of ``_kernels.c`` when they can be built (:mod:`gradkit.compress._native`) and otherwise
cache-blocked torch passes with bit tricks on wider integer views. All three perform the same float
operations in the same order, so for the same noise they agree bit for bit; tests hold them to it.
Tensors off the CPU go to :mod:`gradkit.compress._device` instead (fused Triton kernels on CUDA, no
cache blocks, no host synchronisation), which computes the same codes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from gradkit.compress import _native

__all__ = ["BITS", "ROUNDINGS", "Packed", "pack", "unpack", "pack_reference", "unpack_reference",
           "error_bound"]

BITS = (2, 4, 8)
ROUNDINGS = ("stochastic", "nearest")
_LITTLE_ENDIAN = sys.byteorder == "little"
# Where a non-negative group's code 1 decodes, in steps above zero: small enough to bias nothing that
# matters, large enough that the decoded value is a positive float (mask exactness).
_EPSILON = 2.0**-10
# Shrinks the scale a hair so that x*inv + noise stays below L+1 after float rounding: the fast path
# can then truncate to an integer without a clamp pass and the code still never overflows.
_SAFETY = 1.0 - 2.0**-18
# Tensors with fewer elements keep float32 ranges (fewer small operations per pack).
_HALF_RANGES_MIN = 65536
# Elements per block of the fast path's elementwise passes (256 KiB of float32: fits a core's L2).
_BLOCK_ELEMENTS = 65536


@dataclass
class Packed:
    """A quantised tensor: packed codes plus the per-group ranges needed to decode it."""

    data: torch.Tensor
    """uint8, shape ``(groups, group_size * bits // 8)``."""
    lo: torch.Tensor
    """float16 (float32 when out of range) ``(groups, 1)``: the value of code 0 (0 for non-negative
    groups)."""
    step: torch.Tensor
    """Same dtype as ``lo``: the distance between consecutive codes."""
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    native: bool = False
    """Packed by the C kernels; :func:`unpack` decodes on the same path that packed (never the C kernels
    for codes the torch path wrote)."""

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes plus ranges."""
        return sum(t.untyped_storage().nbytes() for t in (self.data, self.lo, self.step))


def error_bound(packed: Packed, rounding: str) -> torch.Tensor:
    """Largest possible ``|decode - x|`` per group: one step (stochastic) or half a step (nearest),
    plus ``ε·step`` in non-negative groups."""
    step = packed.step.float() / _SAFETY
    bound = step if rounding == "stochastic" else step / 2
    return torch.where(packed.lo == 0, bound + _EPSILON * step, bound)


def _code_shift(lo: torch.Tensor) -> torch.Tensor:
    """1 for non-negative groups (positives start at code 1), else 0; float32 per group."""
    return (lo == 0).float()


def _decode_terms(packed: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ``step``, ``offset`` and ``floor`` of the decode ``max(code·step + offset, floor)``."""
    lo, step = packed.lo.float(), packed.step.float() / _SAFETY
    nonneg = lo == 0
    offset = torch.where(nonneg, -(1.0 - _EPSILON) * step, lo)
    floor = torch.where(nonneg, 0.0, -torch.inf)
    return step, offset, floor


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:
        # Padding repeats the last value, so it never widens a group's range.
        flat = torch.cat((flat, flat[-1:].expand(pad)))
    return flat.view(-1, group_size)


def _ranges(g: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ``lo`` and ``step`` as stored, and ``inv``: see :func:`_ranges_from`."""
    # Two reductions beat torch.aminmax on CPU (measured ~5x): aminmax is not vectorised there.
    return _ranges_from(g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True), bits, g.numel())


def _ranges_from(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ``lo`` and ``step`` as stored, and ``inv`` (1/step shrunk by ``_SAFETY``, float32),
    from the groups' minima and maxima.

    The ranges are stored as float16 when every value fits (half the overhead: 4 bytes per group, so
    int4 with groups of 256 stores 0.516 bytes per element instead of 0.531), rounded outward (``lo``
    down, ``step`` up) so that the range still covers the group and the error bound holds; the codes are
    computed against the rounded values. Otherwise (huge or minuscule values) they stay float32.
    """
    lo, hi = lo.float(), hi.float()
    lo = lo.clamp_max(0.0)  # non-negative groups start at exactly 0
    # Non-negative groups spread their positives over codes 1..L, i.e. L - 1 steps.
    levels = torch.where(lo == 0, float(2**bits - 2), float(2**bits - 1))
    if numel < _HALF_RANGES_MIN:
        # Small tensors: the float16 bookkeeping costs more time than its bytes are worth.
        step = (hi - lo) / levels
        inv = torch.where(step > 0, _SAFETY / step.clamp_min(torch.finfo(torch.float32).tiny),
                          torch.zeros_like(step))
        return lo, step, inv
    lo16 = lo.half()
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, lo16.new_tensor(-torch.inf)), lo16)
    step = (hi - lo16.float()) / levels
    step16 = step.half()
    step16 = torch.where(step16.float() < step, torch.nextafter(step16, step16.new_tensor(torch.inf)),
                         step16)
    fits = torch.isfinite(lo16).all() & torch.isfinite(step16).all() & (
        (step16 == 0) | (step16 >= 2.0**-14)).all()
    if bool(fits):
        lo, step = lo16, step16
    else:
        step = (hi - lo) / levels
    step32 = step.float()
    # A constant group (step 0) decodes to lo exactly; inv 0 keeps its codes at 0.
    inv = torch.where(step32 > 0, _SAFETY / step32.clamp_min(torch.finfo(torch.float32).tiny),
                      torch.zeros_like(step32))
    return lo, step, inv


def _check(bits: int, group_size: int, rounding: str) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    # One limit for every path, so that a group size that works without the C kernels works with them.
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8 or group_size > _native.MAX_GROUP:
        raise ValueError(f"group_size must be a positive multiple of 8 of at most {_native.MAX_GROUP}, "
                         f"got {group_size}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


# -- reference ------------------------------------------------------------------------------------
def pack_reference(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int = 256,
    rounding: str = "stochastic",
    noise: torch.Tensor | None = None,
) -> Packed:
    """Quantise ``x`` (any float tensor) to ``bits``-bit codes; the clear, slow version.

    Args:
        x: tensor to quantise.
        bits: 2, 4 or 8.
        group_size: elements sharing one range (multiple of 8).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
        noise: uniform [0, 1) values, one per element of the padded groups (tests pass the same
            noise to both implementations); drawn with ``torch.rand`` when None.
    """
    _check(bits, group_size, rounding)
    levels = 2**bits - 1
    g = _groups(x, group_size).float()
    lo, step, inv = _ranges(g, bits)
    lo32 = lo.float()
    q = (g - lo32) * inv + _code_shift(lo32)
    if rounding == "nearest":
        codes = torch.floor(q + 0.5)
    else:
        u = torch.rand_like(q) if noise is None else noise.view_as(q)
        codes = torch.floor(q + u)
    codes = codes.clamp(0, levels)
    # Exact zeros: in a non-negative group only zeros get code 0 (positives have codes >= 1 above).
    codes = torch.where((lo32 == 0) & (g <= 0), 0.0, codes).to(torch.uint8)
    per_byte = 8 // bits
    data = torch.zeros(g.shape[0], group_size // per_byte, dtype=torch.uint8, device=x.device)
    for k in range(per_byte):
        data |= codes[:, k::per_byte] << (bits * k)
    return Packed(data, lo, step, x.shape, x.dtype, bits)


def unpack_reference(packed: Packed) -> torch.Tensor:
    """Decode :func:`pack_reference` / :func:`pack` output: ``max(code·step + offset, floor)``."""
    bits, data = packed.bits, packed.data
    per_byte = 8 // bits
    mask = 2**bits - 1
    codes = torch.empty(data.shape[0], data.shape[1] * per_byte, dtype=torch.uint8, device=data.device)
    for k in range(per_byte):
        codes[:, k::per_byte] = (data >> (bits * k)) & mask
    step, offset, floor = _decode_terms(packed)
    values = torch.maximum(codes.float() * step + offset, floor)
    return _restore(values, packed)


def _restore(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    numel = packed.shape.numel()
    flat = values.view(-1)
    if flat.numel() != numel:
        flat = flat[:numel]
    return flat.view(packed.shape).to(packed.dtype)


# -- fast -----------------------------------------------------------------------------------------
def pack(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int = 256,
    rounding: str = "stochastic",
    noise: torch.Tensor | None = None,
) -> Packed:
    """Same codes as :func:`pack_reference` (for the same ``noise``), in fewer memory passes.

    Why the torch path needs no clamp: ``inv`` is shrunk by ``_SAFETY``, so
    ``(x - lo) * inv + shift + u < L + 1`` for ``u < 1`` and truncation toward zero yields at most
    ``L``; the lower end is >= 0. Random noise is drawn as bytes (four per 32-bit draw on the torch
    path, eight per splitmix64 draw in C), i.e. ``u = (b + 0.5) / 256``: unbiased to within 1/512 of a
    step.
    """
    _check(bits, group_size, rounding)
    if noise is not None and noise.numel() != -(-x.numel() // group_size) * group_size:
        raise ValueError(f"noise must have one value per element of the padded groups "
                         f"({-(-x.numel() // group_size) * group_size}), got {noise.numel()}")
    if x.device.type != "cpu":  # GPU: fused kernels, no blocks, no host syncs (_device.py)
        from gradkit.compress import _device

        return _device.pack(x, bits, group_size, rounding, noise)
    if x.dtype == torch.float32 and _native.usable(x):
        return _pack_native(x, bits, group_size, rounding, noise)
    g = _groups(x, group_size)
    if g.dtype != torch.float32:
        g = g.float()
    lo, step, inv = _ranges(g, bits)
    lo32 = lo.float()
    nonneg = lo32 == 0
    shift = _code_shift(lo32)
    count = int(nonneg.sum())  # one synchronisation for both questions
    any_nonneg, all_nonneg = count > 0, count == nonneg.numel()
    flat_noise = None if noise is None else noise.view_as(g)
    # Cache blocking: every elementwise pass runs on a block that stays in the core's cache, instead of
    # streaming the whole tensor through memory once per pass (3-4x faster per element on our CPUs for
    # 8 MB activations). The ranges above are computed once for the whole tensor, so blocks agree
    # with the reference bit for bit.
    rows = max(1, _BLOCK_ELEMENTS // group_size)
    parts = []
    for r0 in range(0, g.shape[0], rows):
        sl = slice(r0, r0 + rows)
        gb = g[sl]
        q = torch.sub(gb, lo32[sl]).mul_(inv[sl]).add_(shift[sl])
        if rounding == "nearest":
            q.add_(0.5)
        elif flat_noise is not None:
            q.add_(flat_noise[sl])
        else:
            q.add_(0.5 / 256).add_(_random_bytes(q.numel(), q.device).view_as(q), alpha=1 / 256)
        codes = q.to(torch.uint8)
        if any_nonneg:
            # Only tensors with a non-negative group pay for the exact-zero pass.
            keep = gb > 0
            if not all_nonneg:
                keep |= ~nonneg[sl]
            codes.mul_(keep.view(torch.uint8))
        parts.append(_pack_codes(codes, bits))
    if not parts:  # an empty tensor: no groups
        data = torch.empty(0, group_size * bits // 8, dtype=torch.uint8, device=x.device)
    else:
        data = parts[0] if len(parts) == 1 else torch.cat(parts)
    return Packed(data, lo, step, x.shape, x.dtype, bits)


def _pack_native(
    x: torch.Tensor, bits: int, group_size: int, rounding: str, noise: torch.Tensor | None
) -> Packed:
    """:func:`pack` in two fused passes of the C kernels (min/max, then codes and packing)."""
    x = x.detach()
    n = x.numel()
    groups = -(-n // group_size)
    lo_raw = torch.empty(groups, 1)
    hi_raw = torch.empty(groups, 1)
    _native.minmax(x, group_size, lo_raw, hi_raw)
    lo, step, inv, lo32 = _native_ranges(None, lo_raw, hi_raw, bits, groups * group_size)
    if rounding == "nearest":
        mode, seed = 0, 0
        noise = None
    elif noise is not None:
        noise = noise.detach().float().contiguous()
        mode, seed = 2, 0
    else:
        # One draw from torch's generator seeds every group's stream: torch.manual_seed reproduces it.
        mode, seed = 1, int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    data = torch.empty(groups, group_size * bits // 8, dtype=torch.uint8)
    _native.pack(x, group_size, lo32, inv, bits, mode, seed, noise, data)
    return Packed(data, lo, step, x.shape, x.dtype, bits, native=True)


def _native_ranges(
    lib: Any, lo_raw: torch.Tensor, hi_raw: torch.Tensor, bits: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ranges_from` in one C call (``gk_ranges``), falling back to torch without _Float16;
    also returns ``lo`` as float32, which the codes are computed against. (``lib`` is unused: the
    checked wrapper in :mod:`._native` finds the library.)"""
    groups = lo_raw.shape[0]
    lo32, step32, inv = torch.empty(groups, 1), torch.empty(groups, 1), torch.empty(groups, 1)
    lo16 = torch.empty(groups, 1, dtype=torch.float16)
    step16 = torch.empty(groups, 1, dtype=torch.float16)
    half = _native.ranges(lo_raw, hi_raw, bits, numel >= _HALF_RANGES_MIN, _SAFETY, lo32, step32, lo16, step16,
                          inv)
    if half < 0:
        lo, step, inv = _ranges_from(lo_raw, hi_raw, bits, numel)
        return lo, step, inv, lo.float().contiguous()
    return (lo16, step16, inv, lo32) if half else (lo32, step32, inv, lo32)


def _random_bytes(n: int, device: torch.device) -> torch.Tensor:
    words = torch.randint(-(2**31), 2**31 - 1, ((n + 3) // 4,), dtype=torch.int32, device=device)
    return words.view(torch.uint8)[:n]


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    if codes.numel() == 0:  # the wider views below need a non-empty, aligned tensor
        return codes.new_empty(codes.shape[0], codes.shape[1] * bits // 8)
    if not _LITTLE_ENDIAN:  # pragma: no cover - the wide-view trick assumes little-endian bytes
        per_byte = 8 // bits
        out = torch.zeros(codes.shape[0], codes.shape[1] // per_byte, dtype=torch.uint8)
        for k in range(per_byte):
            out |= codes[:, k::per_byte] << (bits * k)
        return out
    if bits == 4:
        # Two codes c0 + 256*c1 as one int16: (v | v >> 4) has c0 | c1 << 4 in its low byte.
        v = codes.view(torch.int16)
        return (v | (v >> 4)).to(torch.uint8)
    # bits == 2: four codes as one int32 w = c0 | c1<<8 | c2<<16 | c3<<24; two shift-ors gather them.
    w = codes.view(torch.int32)
    w = w | (w >> 6)
    w = w | (w >> 12)
    return w.to(torch.uint8)


def _unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return data
    if not _LITTLE_ENDIAN:  # pragma: no cover
        per_byte = 8 // bits
        codes = torch.empty(data.shape[0], data.shape[1] * per_byte, dtype=torch.uint8)
        for k in range(per_byte):
            codes[:, k::per_byte] = (data >> (bits * k)) & (2**bits - 1)
        return codes
    if bits == 4:
        # Inverse trick: p | p << 4 as int16, masked, puts p & 15 in the low byte and p >> 4 in the high.
        v = data.to(torch.int16)
        return ((v | (v << 4)) & 0x0F0F).view(torch.uint8)
    w = data.to(torch.int32)
    w = w | (w << 12)
    w = (w | (w << 6)) & 0x03030303
    return w.view(torch.uint8)


def unpack(packed: Packed) -> torch.Tensor:
    """Fast decode, equal to :func:`unpack_reference` (block by block, as :func:`pack`)."""
    data = packed.data
    if data.device.type != "cpu":
        from gradkit.compress import _device

        return _device.unpack(packed)
    step, offset, floor = _decode_terms(packed)
    # The path is the one that packed: the C kernels only decode what they wrote (group sizes they hold).
    if packed.native and packed.dtype == torch.float32 and _native.usable(data):
        return _unpack_native(packed, step.contiguous(), offset.contiguous(), floor.contiguous())
    clamp = bool((packed.lo == 0).any())
    per_byte = 8 // packed.bits
    values = torch.empty(data.shape[0], data.shape[1] * per_byte, dtype=torch.float32, device=data.device)
    rows = max(1, _BLOCK_ELEMENTS // values.shape[1])
    for r0 in range(0, data.shape[0], rows):
        sl = slice(r0, r0 + rows)
        block = values[sl]
        # Convert into the output block, then scale and shift it in place while it is in cache.
        block.copy_(_unpack_codes(data[sl], packed.bits)).mul_(step[sl]).add_(offset[sl])
        if clamp:
            torch.maximum(block, floor[sl], out=block)
    return _restore(values, packed)


def _unpack_native(
    packed: Packed, step: torch.Tensor, offset: torch.Tensor, floor: torch.Tensor
) -> torch.Tensor:
    data = packed.data
    n, group_size = packed.shape.numel(), data.shape[1] * 8 // packed.bits
    if data.dim() != 2 or data.shape[0] != -(-n // group_size):
        raise ValueError(f"packed codes of shape {tuple(data.shape)} do not hold {n} elements in groups of "
                         f"{group_size}")
    out = torch.empty(packed.shape)
    _native.unpack(data, n, group_size, packed.bits, step, offset, floor, out)
    return out
