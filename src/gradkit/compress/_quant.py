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

from typing import Any

import torch

from gradkit.compress import _device, _native
from gradkit.compress._codes import (  # noqa: F401 (the format's names are this module's API too)
    _EPSILON,
    _HALF_RANGES_MIN,
    _LITTLE_ENDIAN,
    _SAFETY,
    BITS,
    ROUNDINGS,
    Packed,
    _check,
    _code_shift,
    _decode_terms,
    _groups,
    _pack_codes,
    _random_bytes,
    _ranges,
    _ranges_from,
    _restore,
    _unpack_codes,
    error_bound,
    pack_reference,
    unpack_reference,
)

__all__ = ["BITS", "ROUNDINGS", "Packed", "pack", "unpack", "pack_reference", "unpack_reference",
           "error_bound"]

# Elements per block of the fast path's elementwise passes (256 KiB of float32: fits a core's L2).
_BLOCK_ELEMENTS = 65536


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


def unpack(packed: Packed) -> torch.Tensor:
    """Fast decode, equal to :func:`unpack_reference` (block by block, as :func:`pack`)."""
    data = packed.data
    if data.device.type != "cpu":
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
