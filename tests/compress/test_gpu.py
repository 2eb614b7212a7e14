"""On a real GPU (skipped without CUDA): the Triton path's codes equal the reference's for the same
noise, pack/unpack and the BLPA unit never synchronise with the host, and an int4 ResNet step's peak
memory is well below the exact step's."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress import Activations, _blpa, _device, _quant, bn_relu_conv
from gradkit.models import build_model

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@contextmanager
def _no_host_sync() -> Iterator[None]:
    """Any synchronising CUDA call inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _triton() -> object:
    pytest.importorskip("triton")
    from gradkit.compress import _triton

    assert _device.triton_enabled(), "triton imports, so CUDA tensors must take the Triton kernels"
    return _triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_codes_equal_reference_on_cuda(bits: int, dtype: torch.dtype) -> None:
    _triton()
    g = torch.Generator(device=CUDA).manual_seed(bits)
    cases = {
        "relu_16MiB": torch.relu(torch.randn(128, 32, 32, 32, device=CUDA, generator=g)),  # float16 ranges
        "signed": torch.randn(64, 1000, device=CUDA, generator=g),
        "huge": torch.randn(70000, device=CUDA, generator=g) * 1e6,  # float32 ranges, decided on device
        "odd": torch.randn(12345, device=CUDA, generator=g),
    }
    for name, x in cases.items():
        x = x.to(dtype)
        noise = torch.rand(-(-x.numel() // 256) * 256, device=CUDA, generator=g)
        for rounding in ("nearest", "stochastic"):
            ref = _quant.pack_reference(x, bits, rounding=rounding, noise=noise)
            fast = _quant.pack(x, bits, rounding=rounding, noise=noise)  # dispatches to Triton
            assert torch.equal(ref.data, fast.data), (name, rounding)
            assert torch.equal(ref.lo.float(), fast.lo) and torch.equal(ref.step.float(), fast.step), name
            # Decoded values: the same float32 operations; a different rounding of torch's own CUDA kernels
            # (e.g. its division by a scalar) may move one float32 ulp, i.e. one bfloat16 ulp at worst.
            rtol = 2.5e-7 if dtype == torch.float32 else 2.0**-7
            torch.testing.assert_close(_quant.unpack(fast), _quant.unpack_reference(ref), rtol=rtol, atol=0)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_pack_unpack_without_host_sync(path: str) -> None:
    x = torch.relu(torch.randn(64, 16, 32, 32, device=CUDA))
    xs = torch.randn(64, 16, 32, 32, device=CUDA, dtype=torch.bfloat16)
    if path == "triton":
        _triton()
        pack, unpack = _quant.pack, _quant.unpack
    else:
        def pack(t: torch.Tensor, bits: int, rounding: str = "stochastic") -> _quant.Packed:
            return _device.pack_torch(t, bits, 256, rounding, None)

        unpack = _device.unpack_torch
    for t in (x, xs):  # compile and warm up outside the check
        for rounding in ("stochastic", "nearest"):
            unpack(pack(t, 4, rounding=rounding))
    with _no_host_sync():
        for t in (x, xs):
            for bits in (2, 4, 8):
                for rounding in ("stochastic", "nearest"):
                    unpack(pack(t, bits, rounding=rounding))


def test_blpa_unit_without_host_sync_and_close_to_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    _triton()
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16).to(CUDA)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-1.5, 2.0, 16))
        bn.bias.copy_(torch.linspace(-4.0, 5.0, 16))  # thresholds inside and outside the window
    conv = nn.Conv2d(16, 16, 3, padding=1).to(CUDA)
    x = torch.randn(32, 16, 16, 16, device=CUDA) * 2 + 1

    def run(bn: nn.BatchNorm2d, conv: nn.Conv2d, check_sync: bool) -> list[torch.Tensor]:
        xx = x.clone().requires_grad_()
        with _no_host_sync() if check_sync else nullcontext():
            out = bn_relu_conv(xx, bn, conv, 4)
            out.backward(torch.ones_like(out))
        assert bn.weight.grad is not None and bn.bias.grad is not None and conv.weight.grad is not None
        return [out.detach(), xx.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad]  # type: ignore[list-item]

    run(copy.deepcopy(bn), copy.deepcopy(conv), False)  # compile
    tri = run(copy.deepcopy(bn), copy.deepcopy(conv), True)
    monkeypatch.setattr(_blpa, "_triton_ok", lambda x, bits: False)
    ref = run(copy.deepcopy(bn), copy.deepcopy(conv), False)
    for a, b in zip(tri, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _step_peak(mode: str, batch: int) -> int:
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    act = Activations(model, mode)
    x = torch.randn(batch, 3, 32, 32, device=CUDA)
    y = torch.randint(0, 10, (batch,), device=CUDA)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with act:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()  # optimizer state exists from here on
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.xfail(strict=True, reason="unmet target, measured on an H200 (2026-11-27): int4 peak 185 MiB "
                   "against exact 260 MiB (0.71, not <= 0.6); not cuDNN's workspace (capping it changed nothing); "
                   "see benchmarks/gpu/README.md")
def test_int4_step_peak_memory_well_below_exact() -> None:
    """Stored bytes fall ~7x at int4; the step's peak must follow (here: at most 0.6 of exact), i.e.
    decoded copies and temporaries do not pile up."""
    exact = _step_peak("exact", 128)
    int4 = _step_peak("int4", 128)
    assert int4 <= 0.6 * exact, (int4 / 2**20, exact / 2**20)
