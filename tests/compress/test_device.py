"""The torch path for tensors off the CPU (CUDA without triton): every decision on the device, the
reference's codes. Checked here on CPU tensors by calling it directly / forcing its branches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradkit.compress import _blpa, _device, _native, _quant, bn_relu_conv


def test_torch_device_pack_equals_reference() -> None:
    g = torch.Generator().manual_seed(5)
    cases = {
        "normal": torch.randn(3, 1000, generator=g),
        "relu_half_ranges": torch.relu(torch.randn(70000, generator=g)),  # float16 ranges (>= 65536)
        "huge": torch.randn(70000, generator=g) * 1e6,  # float16 does not fit: decided on the device
        "minuscule": torch.randn(70000, generator=g) * 1e-7,
        "odd_size": torch.randn(7, generator=g),
    }
    for name, x in cases.items():
        for bits in (2, 4, 8):
            for rounding in ("nearest", "stochastic"):
                noise = torch.rand(-(-x.numel() // 256) * 256, generator=g)
                ref = _quant.pack_reference(x, bits, rounding=rounding, noise=noise)
                dev = _device.pack_torch(x, bits, 256, rounding, noise)
                assert torch.equal(ref.data, dev.data), name
                assert torch.equal(ref.lo.float(), dev.lo) and torch.equal(ref.step.float(), dev.step), name
                assert torch.equal(_quant.unpack_reference(ref), _device.unpack_torch(dev)), name


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blpa_torch_path_without_host_decisions_is_identical(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU the BLPA torch path fixes the end codes of every channel with masks instead of asking
    the host which channels need it: same codes and gradients (thresholds below, inside, above)."""
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", True)
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 0.0, 0.5, 0.3, -1.2, 0.8, 1e-3]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.5, -4.0, 0.0, 5.0, -3.0, 0.01]))  # t = 8 and 3.75: above
    x = torch.randn(4, 8, 6, 6) * 2 + 1

    def run() -> list[torch.Tensor]:
        b, c = copy.deepcopy(bn), copy.deepcopy(conv)
        xx = x.clone().requires_grad_()
        out = bn_relu_conv(xx, b, c, bits)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out.detach(), xx.grad, b.weight.grad, b.bias.grad, c.weight.grad]  # type: ignore[list-item]

    encoded: list[torch.Tensor] = []
    real = _blpa._torch_encode
    monkeypatch.setattr(_blpa, "_torch_encode", lambda *a: encoded.append(real(*a)[1]) or real(*a))
    host = run()
    monkeypatch.setattr(_blpa, "_host_decides", lambda t: False)
    device = run()
    assert torch.equal(encoded[0], encoded[1])
    for a, b in zip(host, device, strict=True):
        assert torch.equal(a, b)
