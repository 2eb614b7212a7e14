"""The per-group quantiser: error bound, unbiasedness, no overflow, exact zeros, fast == reference."""

from __future__ import annotations

import pytest
import torch

from gradkit.compress import pack, pack_reference, unpack, unpack_reference
from gradkit.compress._quant import _SAFETY, _unpack_codes, error_bound

# Every test runs on the fused C kernels and on the torch path (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")

BITS = (2, 4, 8)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(3, 1000, generator=g),
        "relu": torch.relu(torch.randn(4, 16, 8, 8, generator=g)),
        "odd_size": torch.randn(7, generator=g),
        "huge": torch.randn(1000, generator=g) * 1e6,  # ranges stay float32 (out of float16 range)
        "minuscule": torch.randn(999, generator=g) * 1e-7,
        "constant": torch.full((3000,), -5.0),
        "zeros": torch.zeros(2048),
        "offset": 100.0 + torch.rand(2048, generator=g),
    }


def _group_errors(x: torch.Tensor, decoded: torch.Tensor, group_size: int = 256) -> torch.Tensor:
    err = (decoded - x).abs().reshape(-1)
    pad = (-err.numel()) % group_size
    return torch.cat((err, err.new_zeros(pad))).view(-1, group_size)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", list(_inputs()))
def test_round_trip_within_bound_and_fast_equals_reference(bits: int, rounding: str, name: str) -> None:
    x = _inputs()[name]
    groups = (x.numel() + 255) // 256
    noise = torch.rand(groups * 256, generator=torch.Generator().manual_seed(1))
    ref = pack_reference(x, bits, rounding=rounding, noise=noise)
    fast = pack(x, bits, rounding=rounding, noise=noise)
    assert torch.equal(ref.data, fast.data)  # identical codes for identical noise
    assert ref.data.dtype == torch.uint8 and ref.data.numel() == groups * 256 * bits // 8  # really packed
    decoded = unpack(fast)
    torch.testing.assert_close(decoded, unpack_reference(ref), rtol=0,
                               atol=float(ref.step.float().max()) * 1e-4)
    assert decoded.shape == x.shape and decoded.dtype == x.dtype
    # |decoded - x| <= step (stochastic) or step/2 (nearest), per group (float slack 1e-4 relative).
    assert (_group_errors(x, decoded) <= error_bound(fast, rounding) * 1.0001).all()


@pytest.mark.parametrize("bits", BITS)
def test_exact_zeros_keep_relu_masks_bit_exact(bits: int) -> None:
    x = torch.relu(torch.randn(64, 500, generator=torch.Generator().manual_seed(2)))
    x[0, :5] = 1e-12  # far below one step: must still decode as positive
    for rounding in ("nearest", "stochastic"):
        decoded = unpack(pack(x, bits, rounding=rounding))
        assert torch.equal(decoded > 0, x > 0)
        assert torch.equal(decoded == 0, x == 0)


@pytest.mark.parametrize("bits", BITS)
def test_codes_never_overflow(bits: int) -> None:
    """Noise just below 1 on values at the top of their range must not carry into the next code."""
    levels = 2**bits - 1
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    x[::256] = x.view(-1, 256).amax(dim=1)  # ties at each group's maximum
    worst = torch.full((4096,), 1.0 - 2.0**-24)
    for packed in (pack(x, bits, noise=worst), pack_reference(x, bits, noise=worst), pack(x, bits)):
        codes = _unpack_codes(packed.data, bits)
        assert int(codes.max()) <= levels
        top = x.view(-1, 256).amax(dim=1, keepdim=True)
        decoded = unpack(packed).view(-1, 256)
        assert (decoded <= top + packed.step.float() / _SAFETY * 1.0001).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("sign", ["signed", "relu"])
def test_stochastic_rounding_is_unbiased(bits: int, impl: str, sign: str) -> None:
    """Mean of 400 decodes matches x to within 4 standard errors of the mean (+ 1/512 step for the
    byte noise of the fast path, + ε·step in non-negative groups); nearest rounding, by contrast, is
    visibly biased. ReLU outputs include many positives below one step: rounding those up to the first
    level (a simple way to keep masks exact) would fail this."""
    torch.manual_seed(4)
    x = torch.randn(2048) * 3
    if sign == "relu":
        x = x.relu()
    p = pack if impl == "fast" else pack_reference
    n = 400
    total = torch.zeros_like(x)
    for _ in range(n):
        total += unpack(p(x, bits, rounding="stochastic"))
    mean = total / n
    step = p(x, bits).step.float().repeat_interleave(256).view_as(x)
    # The variance of a stochastic rounding is at most step^2/4.
    tolerance = 4 * (step / 2) / n**0.5 + step / 512 + step / 1024 + 1e-6
    assert ((mean - x).abs() <= tolerance).float().mean() > 0.999
    assert (mean - x).abs().mean() < 0.05 * step.mean()
    nearest_bias = (unpack(p(x, bits, rounding="nearest")) - x).abs().mean()
    assert (mean - x).abs().mean() < nearest_bias / 4


def test_half_precision_input_round_trips_in_its_dtype() -> None:
    x = torch.randn(1024).to(torch.bfloat16)
    decoded = unpack(pack(x, 8))
    assert decoded.dtype == torch.bfloat16
    assert (decoded.float() - x.float()).abs().max() < 0.05
