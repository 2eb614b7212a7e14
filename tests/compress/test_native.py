"""The fused C kernels: same results as the torch path, reproducible, and a clean fallback without them."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradkit.compress import _blpa, _native, bn_relu_conv, pack, pack_reference, unpack


def _unit(conv: torch.nn.Conv2d | None = None) -> tuple[torch.nn.BatchNorm2d, torch.nn.Conv2d]:
    """γ negative, zero and tiny; thresholds -β/γ inside and far outside the ±3 window."""
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0, 0.3, -1.2, 0.8, 1e-3]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.5, -4.0, 0.0, 5.0, -0.3, 0.01]))
    torch.manual_seed(5)
    return bn, conv if conv is not None else torch.nn.Conv2d(8, 6, 3, padding=1, stride=2)


@pytest.fixture
def native() -> None:
    if _native.kernels() is None:
        pytest.skip("no C compiler here: the fused kernels cannot be built")


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Forget the loaded library and build into an empty cache folder."""
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GRADKIT_KERNELS", raising=False)
    return tmp_path


@pytest.mark.usefixtures("native")
def test_stochastic_pack_follows_torch_seed_and_not_the_thread_split() -> None:
    x = torch.randn(600_000)  # above the size at which work is split across threads
    torch.manual_seed(0)
    one = pack(x, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        two = pack(x, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.data, two.data)
    torch.manual_seed(1)
    assert not torch.equal(pack(x, 4).data, one.data)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blpa_unit_kernels_match_torch_path(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same codes and conv input in forward; gradients equal up to summation order (float64 sums in C,
    float32 in torch). The unit's γ/β put thresholds inside and far outside the window."""
    torch.manual_seed(0)
    bn, conv = _unit()
    x = (torch.randn(6, 8, 10, 10) * 2 + 1).requires_grad_()
    grads = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(_native, "_lib", None)
            monkeypatch.setattr(_native, "_tried", True)
        b, c = _unit(conv)
        out = bn_relu_conv(x, b, c, bits)
        out.backward(torch.ones_like(out))
        grads[path] = [out.detach(), x.grad.clone(), b.weight.grad, b.bias.grad, c.weight.grad]
        x.grad = None
    for native_t, torch_t in zip(grads["native"], grads["torch"], strict=True):
        torch.testing.assert_close(native_t, torch_t, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blpa_encoders_bit_identical(bits: int) -> None:
    """Same codes (end-code rule included) and the same conv input, bit for bit."""
    levels, s = 2**bits - 1, _blpa._WINDOW / 2**bits
    g = torch.randn(8)
    a_v, b_v = (g / s).view(1, -1, 1, 1), (torch.randn(8) * 3).view(1, -1, 1, 1)
    scale_y, shift_y = torch.rand(8).view(1, -1, 1, 1), torch.zeros(1, 8, 1, 1)
    c_t = torch.tensor([0.0, 1.0, levels + 1.0, 3.0, float(levels), 2.0, -1.0, levels + 3.0])
    offset = (c_t - 1).view(1, -1, 1, 1)
    xx = torch.randn(6, 8, 10, 10) * 3
    y_n, data_n = _blpa._native_encode(xx, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
    y_t, data_t, packed_bits = _blpa._torch_encode(xx, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
    assert packed_bits == bits
    assert torch.equal(y_n, y_t) and torch.equal(data_n, data_t)


def test_without_a_compiler_everything_runs_on_torch(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native.shutil, "which", lambda _name: None)
    assert _native.kernels() is None
    x = torch.relu(torch.randn(5000))
    noise = torch.rand(20 * 256)
    assert torch.equal(pack(x, 4, noise=noise).data, pack_reference(x, 4, noise=noise).data)
    assert torch.equal(unpack(pack(x, 4)) > 0, x > 0)


def test_kernels_can_be_turned_off(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADKIT_KERNELS", "torch")
    assert _native.kernels() is None
    assert not list(fresh_build.iterdir())  # nothing was built


def test_failed_build_warns_once_and_leaves_no_partial_library(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(_native, "_FLAGS", [*_native._FLAGS, "--no-such-compiler-flag"])
    with caplog.at_level(logging.WARNING, logger="gradkit.compress._native"):
        assert _native.kernels() is None
        assert _native.kernels() is None  # not retried
    assert len([r for r in caplog.records if "could not build" in r.message]) == 1
    assert not list(fresh_build.glob("*.so"))


def test_build_is_cached(fresh_build: Path) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler here")
    assert _native.kernels() is not None
    (built,) = fresh_build.glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    _native._lib, _native._tried = None, False
    assert _native.kernels() is not None
    assert built.stat().st_mtime_ns == stamp and list(fresh_build.glob("*.so")) == [built]


@pytest.mark.usefixtures("native")
def test_training_step_with_native_kernels_matches_torch_path_for_blpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole ResNet step under blpa4 (deterministic rounding): the two paths give the same gradients."""
    from gradkit.compress import Activations
    from gradkit.models import build_model

    torch.manual_seed(0)
    base = build_model("resnet20", (3, 32, 32), 10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    result = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(_native, "_lib", None)
            monkeypatch.setattr(_native, "_tried", True)
        model = copy.deepcopy(base)
        with Activations(model, "blpa4"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        result[path] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = F.cosine_similarity(result["native"], result["torch"], dim=0)
    assert cos > 0.99999


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_range_kernel_matches_torch_ranges(bits: int) -> None:
    """Stored ranges (float16 when every group fits, else float32) and inv, bit for bit."""
    from gradkit.compress import _quant

    g = torch.Generator().manual_seed(0)
    cases = {
        "normal": torch.randn(300, 256, generator=g),
        "relu": torch.randn(300, 256, generator=g).relu(),
        "tiny_negative": torch.full((300, 256), -1e-9),  # rounds to -0 in float16: lo moves down
        "huge": torch.randn(300, 256, generator=g) * 1e6,  # does not fit float16: float32 for all
        "minuscule": torch.randn(300, 256, generator=g) * 1e-7,
        "constant": torch.full((300, 256), 3.0),
        "zeros": torch.zeros(300, 256),
    }
    for name, x in cases.items():
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        for numel in (x.numel(), 1000):  # above and below the float16 threshold
            want = _quant._ranges_from(mn, mx, bits, numel)
            *got, lo32 = _quant._native_ranges(_native.kernels(), mn, mx, bits, numel)
            for w, o in zip(want, got, strict=True):
                assert w.dtype == o.dtype and torch.equal(w, o), (name, numel)
            assert lo32.dtype == torch.float32 and torch.equal(lo32, want[0].float()), (name, numel)
