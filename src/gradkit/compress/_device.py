"""Pack and unpack for tensors off the CPU (CUDA): one job per launch, no host synchronisation.

The CPU path (C kernels, cache-blocked torch passes) suits a CPU: it walks the tensor in blocks that
fit a core's cache and asks the host a question or two per tensor. On a GPU each block is a kernel
launch and each question a stall, hundreds per tensor. Here a CUDA tensor goes to the fused Triton
kernels (:mod:`._triton`) when triton imports, else to whole-tensor torch operations whose every
decision (non-negative groups, float16 ranges) is taken on the device with ``torch.where``.

Either way the ranges are stored as float32 tensors holding the reference's values (see
:mod:`._triton`): choosing a float16 dtype would need the host to read a device flag.
"""

from __future__ import annotations

import functools

import torch

from gradkit.compress import _codes
from gradkit.compress._codes import _HALF_RANGES_MIN, _SAFETY, Packed

__all__ = ["pack", "unpack", "triton_enabled"]


@functools.lru_cache(maxsize=1)
def triton_enabled() -> bool:
    """Whether CUDA tensors take the Triton kernels (triton imports; ``GRADKIT_TRITON=0`` turns it off)."""
    import os

    if os.environ.get("GRADKIT_TRITON", "1") == "0":
        return False
    from gradkit.compress import _triton

    return _triton.available()


def pack(x: torch.Tensor, bits: int, group_size: int, rounding: str, noise: torch.Tensor | None) -> Packed:
    if x.is_cuda and triton_enabled():
        from gradkit.compress import _triton

        return _triton.pack(x, bits, group_size=group_size, rounding=rounding, noise=noise)
    return pack_torch(x, bits, group_size, rounding, noise)


def unpack(packed: Packed) -> torch.Tensor:
    if packed.data.is_cuda and triton_enabled():
        from gradkit.compress import _triton

        return _triton.unpack(packed)
    return unpack_torch(packed)


def _ranges(lo: torch.Tensor, hi: torch.Tensor, bits: int, numel: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """:func:`gradkit.compress._codes._ranges_from` with the float16 decision taken on the device:
    float32 ``lo``, ``step`` (float16-rounded when the reference stores float16) and ``inv``."""
    lo, hi = lo.float().clamp_max(0.0), hi.float()
    levels = torch.where(lo == 0, float(2**bits - 2), float(2**bits - 1))
    step = (hi - lo) / levels
    if numel >= _HALF_RANGES_MIN:
        lo16 = lo.half()
        lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, -torch.inf)), lo16)
        step_h = (hi - lo16.float()) / levels
        step16 = step_h.half()
        step16 = torch.where(step16.float() < step_h, torch.nextafter(step16, torch.full_like(step16, torch.inf)),
                             step16)
        fits = torch.isfinite(lo16).all() & torch.isfinite(step16).all() & (
            (step16 == 0) | (step16 >= 2.0**-14)).all()
        lo = torch.where(fits, lo16.float(), lo)
        step = torch.where(fits, step16.float(), step)
    inv = torch.where(step > 0, _SAFETY / step.clamp_min(torch.finfo(torch.float32).tiny),
                      torch.zeros_like(step))
    return lo, step, inv


def pack_torch(
    x: torch.Tensor, bits: int, group_size: int, rounding: str, noise: torch.Tensor | None
) -> Packed:
    """The reference's codes in whole-tensor torch operations (no blocks, no host reads)."""
    levels = 2**bits - 1
    g = _codes._groups(x, group_size).float()
    lo, step, inv = _ranges(g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True), bits, g.numel())
    nonneg = lo == 0
    q = (g - lo) * inv + _codes._code_shift(lo)
    if rounding == "nearest":
        codes = torch.floor(q + 0.5)
    else:
        u = torch.rand_like(q) if noise is None else noise.to(q.device).view_as(q)
        codes = torch.floor(q + u)
    codes = torch.where(nonneg & (g <= 0), 0.0, codes.clamp_(0, levels)).to(torch.uint8)
    return Packed(_codes._pack_codes(codes, bits), lo, step, x.shape, x.dtype, bits)


def unpack_torch(packed: Packed) -> torch.Tensor:
    step, offset, floor = _codes._decode_terms(packed)
    codes = _codes._unpack_codes(packed.data, packed.bits)
    values = torch.maximum(codes.float() * step + offset, floor)
    return _codes._restore(values, packed)
