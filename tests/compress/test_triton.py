"""The Triton kernels (the CUDA path) held to the reference: same codes for the same noise.

Without a GPU these run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before
triton is imported) on small CPU tensors, by calling the kernels' entry points directly; with a GPU
they run on CUDA tensors. Skipped when triton is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from gradkit.compress import _blpa, _codes, _quant, _triton, bn_relu_conv  # noqa: E402

if not _triton._INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET was set, and there is no GPU",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(3, 1000, generator=g),
        "relu": torch.relu(torch.randn(4, 16, 8, 8, generator=g)),
        "odd_size": torch.randn(7, generator=g),
        "huge": torch.randn(1000, generator=g) * 1e6,  # float16 ranges do not fit: float32 values
        "minuscule": torch.randn(999, generator=g) * 1e-7,
        "constant": torch.full((3000,), -5.0),
        "zeros": torch.zeros(2048),
        "offset": 100.0 + torch.rand(2048, generator=g),
        "mixed_signs_relu": torch.cat((torch.relu(torch.randn(1024, generator=g)), torch.randn(1024, generator=g))),
    }


@pytest.fixture
def small_half_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 ranges from 1024 elements on (65536 in production): the interpreter is slow."""
    monkeypatch.setattr(_codes, "_HALF_RANGES_MIN", 1024)
    monkeypatch.setattr(_triton, "_HALF_RANGES_MIN", 1024)


def _assert_same_decode(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:  # torch's own CUDA kernels may round a product differently; the codes are what must agree
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0)


@pytest.mark.parametrize("half", [False, True], ids=["float32_ranges", "float16_ranges"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_and_ranges_equal_reference_for_same_noise(bits: int, rounding: str, half: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if half:
        monkeypatch.setattr(_codes, "_HALF_RANGES_MIN", 1024)
        monkeypatch.setattr(_triton, "_HALF_RANGES_MIN", 1024)
    g = torch.Generator().manual_seed(bits)
    for name, x in _inputs().items():
        x = x.to(DEVICE)
        noise = torch.rand(-(-x.numel() // 256) * 256, generator=g).to(DEVICE)
        ref = _quant.pack_reference(x, bits, rounding=rounding, noise=noise)
        tri = _triton.pack(x, bits, rounding=rounding, noise=noise)
        assert torch.equal(ref.data, tri.data), name
        # Ranges: the reference's values (float16 ones when it stores float16), held as float32.
        assert torch.equal(ref.lo.float(), tri.lo) and torch.equal(ref.step.float(), tri.step), name
        if half and name in ("normal", "relu", "offset"):
            assert ref.lo.dtype == torch.float16  # the float16 rounding really was exercised
        if name == "huge":
            assert ref.lo.dtype == torch.float32  # and so was the device-side fallback
        _assert_same_decode(_quant.unpack_reference(ref), _triton.unpack(tri))
        assert _triton.unpack(tri).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("group_size", [8, 24, 1024])
def test_group_sizes_and_other_dtypes(group_size: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(group_size)
    x = torch.randn(5, 333, generator=g)
    x[0] = x[0].relu()
    x = x.to(dtype).to(DEVICE)
    for bits in (2, 4, 8):
        noise = torch.rand(-(-x.numel() // group_size) * group_size, generator=g).to(DEVICE)
        ref = _quant.pack_reference(x, bits, group_size=group_size, noise=noise)
        tri = _triton.pack(x, bits, group_size=group_size, noise=noise)
        assert torch.equal(ref.data, tri.data)
        out = _triton.unpack(tri)
        assert out.dtype == dtype
        _assert_same_decode(_quant.unpack_reference(ref), out)


def test_philox_noise_reproducible_and_unbiased() -> None:
    """Stochastic rounding without given noise: ``torch.manual_seed`` reproduces the codes, the codes
    are not those of nearest rounding, and the decode is unbiased: averaged over 32 seeds the mean
    error per element is ~0 (in steps), and the share of elements rounded up matches the fractional
    parts it should follow (z-score)."""
    x = (torch.rand(8, 512, generator=torch.Generator().manual_seed(7)) * 4 - 1).to(DEVICE)
    torch.manual_seed(3)
    a = _triton.pack(x, 2, group_size=512)
    torch.manual_seed(3)
    b = _triton.pack(x, 2, group_size=512)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, _triton.pack(x, 2, group_size=512, rounding="nearest").data)
    step = a.step.float() / _quant._SAFETY  # per group; these groups are signed (lo < 0)
    assert bool((a.lo < 0).all())
    draws = torch.stack([_triton.unpack(_triton.pack(x, 2, group_size=512, seed=s)) for s in range(32)])
    err = (draws - x).view(32, 8, 512) / step.view(1, 8, 1)
    assert float(err.mean().abs()) < 0.01  # 32 * 4096 draws: the standard error is ~0.0015
    q = ((x.view(8, 512) - a.lo.float()) / step)  # position in steps; P(round up) = frac(q)
    frac = q - q.floor()
    up = (draws.view(32, 8, 512) - (a.lo.float() + q.floor() * step).view(1, 8, 512)) > step.view(1, 8, 1) / 2
    expected, n = float(frac.sum()) * 32, frac.numel() * 32
    var = float((frac * (1 - frac)).sum()) * 32
    assert abs(float(up.sum()) - expected) < 5 * var**0.5 + 1, (float(up.sum()), expected, n)


def test_cpu_dispatch_never_takes_the_triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even under the interpreter, CPU tensors go to the C kernels / torch path, not to Triton."""
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("Triton path taken for a CPU tensor")

    monkeypatch.setattr(_triton, "pack", boom)
    monkeypatch.setattr(_triton, "unpack", boom)
    monkeypatch.setattr(_triton, "blpa_encode", boom)
    x = torch.randn(4, 8, 6, 6)
    _quant.unpack(_quant.pack(x, 4))
    bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)
    bn_relu_conv(x.requires_grad_(), bn, conv, 4).sum().backward()


GAMMA = [1.0, -0.5, 0.0, 2.0, 0.3, -1.2, 0.8, 1e-3]
BETA = [0.1, 0.2, 0.5, -4.0, 0.0, 5.0, -0.3, 0.01]


def _blpa_run(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, bits: int, *, triton: bool,
              monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if triton:
        real = _triton.blpa_encode

        def encode(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
            captured["out"] = real(*args)  # type: ignore[arg-type]
            return captured["out"]

        monkeypatch.setattr(_triton, "blpa_encode", encode)
        monkeypatch.setattr(_blpa, "_native_ok", lambda x, bits=8: False)
        monkeypatch.setattr(_blpa, "_triton_ok", lambda x, bits: _triton.blpa_ok(x, bits))
    else:
        real_native = _blpa._native_encode

        def native(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
            captured["out"] = real_native(*args)  # type: ignore[arg-type]
            return captured["out"]

        monkeypatch.setattr(_blpa, "_native_encode", native)
    bn, conv = copy.deepcopy(bn), copy.deepcopy(conv)
    x = x.clone().requires_grad_()
    out = bn_relu_conv(x, bn, conv, bits)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
    monkeypatch.undo()
    grads = [out.detach(), x.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad, bn.running_var]
    return grads, captured["out"]  # type: ignore[return-value]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_blpa_passes_equal_the_fused_c_kernels(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The BLPA unit on the Triton passes: the same conv input, the same packed codes (thresholds inside
    and outside the window, γ negative and zero), and the same gradients as the C kernels."""
    if DEVICE.type != "cpu":
        pytest.skip("compared with the CPU's C kernels under the interpreter")
    from gradkit.compress import _native

    if _native.kernels() is None:
        pytest.skip("no C compiler: the fused C kernels to compare with cannot be built")
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1, stride=2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(GAMMA))
        bn.bias.copy_(torch.tensor(BETA))
    x = torch.randn(2, 8, 6, 6) * 2 + 1
    ref, (y_ref, data_ref) = _blpa_run(x, bn, conv, bits, triton=False, monkeypatch=monkeypatch)
    tri, (y_tri, data_tri) = _blpa_run(x, bn, conv, bits, triton=True, monkeypatch=monkeypatch)
    assert torch.equal(y_ref, y_tri)
    assert torch.equal(data_ref, data_tri)
    for a, b in zip(ref, tri, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gradkit.compress import _triton as T

P32, PU8 = "*fp32", "*u8"


def compile_ptx(fn, signature, constexprs):
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    kernel = triton.compile(ASTSource(fn, full, constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"enable_fp_fusion": False})
    return kernel.asm["ptx"]


block, bytes_block, rows = T._layout(256, 4)
compile_ptx(T._minmax_kernel, {"x_ptr": "*bf16", "n": "i64", "groups": "i64", "lo_ptr": P32, "hi_ptr": P32,
                               "flag_ptr": "*i32"},
            {"GS": 256, "BLOCK": block, "ROWS": rows, "LEVELS": 15, "HALF": True})
pack = compile_ptx(T._pack_kernel, {"x_ptr": P32, "n": "i64", "groups": "i64", "lo_ptr": P32, "hi_ptr": P32,
                                    "flag_ptr": "*i32", "noise_ptr": P32, "seed": "i64", "data_ptr": PU8,
                                    "lo_out": P32, "step_out": P32},
                   {"GS": 256, "BYTES_BLOCK": bytes_block, "PER_BYTE": 2, "BITS": 4, "ROWS": rows, "HALF": True,
                    "MODE": 1, "SAFETY": T._SAFETY})
unpack = compile_ptx(T._unpack_kernel, {"data_ptr": PU8, "n": "i64", "groups": "i64", "lo_ptr": P32,
                                        "step_ptr": P32, "out_ptr": "*bf16"},
                     {"GS": 256, "BYTES_BLOCK": bytes_block, "PER_BYTE": 2, "BITS": 4, "ROWS": rows,
                      "SAFETY": T._SAFETY, "EPSILON": T._EPSILON, "RECIPROCAL": True, "OUT_BF16": True})
# The reference rounds every product and sum separately, and divides exactly.
assert "fma.rn.f32" not in pack and "fma.rn.f32" not in unpack
assert "div.rn.f32" in pack and "div.full.f32" not in pack
per_byte, bb = T._blpa_layout(1024, 4)
meta = {"BITS": 4, "PER_BYTE": per_byte, "BYTES_BLOCK": bb}
plane = {"C": "i32", "HW": "i32"}
compile_ptx(T._blpa_encode_kernel, {**{k: P32 for k in ("x_ptr", "a_ptr", "b_ptr", "sy_ptr", "hy_ptr", "off_ptr",
                                                         "ct_ptr", "y_ptr")}, "data_ptr": PU8, **plane}, meta)
compile_ptx(T._blpa_decode_kernel, {"data_ptr": PU8, **{k: P32 for k in ("centre_ptr", "ct_ptr", "sy_ptr",
                                                                          "hy_ptr", "y_ptr")}, **plane}, meta)
compile_ptx(T._blpa_mask_sums_kernel, {"g_ptr": P32, "y_ptr": P32, "data_ptr": PU8, "centre_ptr": P32,
                                       "ct_ptr": P32, "sums_ptr": "*fp64", **plane}, meta)
compile_ptx(T._blpa_grad_input_kernel, {"g_ptr": P32, "data_ptr": PU8, **{k: P32 for k in (
    "centre_ptr", "ct_ptr", "xs_ptr", "xt_ptr", "mg_ptr", "mgx_ptr", "k_ptr")}, **plane}, meta)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_one(tmp_path: object) -> None:
    """The interpreter forgives what the compiler does not (Python globals in a kernel, scalar/block
    type mixes): every kernel is compiled ahead of time for sm_90 (Triton's own ptxas, no GPU needed),
    in a subprocess without TRITON_INTERPRET, and the pack/unpack PTX has no fused multiply-add and an
    exact division, as the reference's float operations require."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(_triton.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
