"""The packed-code format of the generic quantiser and its pure-PyTorch reference.

What every implementation of ``pack``/``unpack`` shares (:mod:`gradkit.compress._quant` on the CPU,
:mod:`gradkit.compress._device` and :mod:`gradkit.compress._triton` off it): :class:`Packed`, the
ranges, the code layout and the reference quantiser the fast paths are tested against. See
:mod:`gradkit.compress._quant` for the quantisation scheme itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gradkit.compress import _native

__all__ = ["BITS", "ROUNDINGS", "Packed", "pack_reference", "unpack_reference", "error_bound"]

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
