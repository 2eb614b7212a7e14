"""The faithful path: BatchNorm -> ReLU -> Conv as one autograd function that keeps 4/8-bit codes.

Chakrabarti & Moseley, "Backprop with Approximate Activations for Memory-efficient Network Training"
(NeurIPS 2019), Sec. 3: the forward pass is exact; for backward the unit keeps only a ``bits``-bit code
of the normalised value ``x̂ = (x - μ) / σ`` per element plus per-channel statistics. The quantiser is
uniform over a 6σ window (±3 in ``x̂``) with ``2**bits`` bins, shifted per channel so that the ReLU
threshold ``x̂ = -β/γ`` is a bin edge, and decodes to the bin centre. So:

* the ReLU mask read from the codes is exact (bins lie wholly on one side of the threshold),
* the conv's input gradient and the BN shift (β) gradient are exact,
* only the conv weight gradient, the BN scale (γ) gradient and the BN variance term see the
  approximation.

Beyond the reference (TensorFlow 1, hand-written graph): running statistics are updated as
``nn.BatchNorm2d`` does, eval mode (running statistics) works with gradients enabled, γ may be
negative or zero (the window is laid out for ``sign(γ)·x̂``; a zero-γ channel's ReLU is constant), and
the threshold keeps at least one bin on each side even when it falls outside ±3 (the reference's rare
mask failure when ``β/γ <= -3 + 6/2**bits``).

Everything is computed in "v" units per channel, ``v = (sign(γ)·x̂ - t) / s`` with threshold
``t = -β/|γ|`` and bin width ``s = 6 / 2**bits``, so that the ReLU input is ``|γ|·s·v`` and its sign is
the sign of ``v`` exactly, in floating point too: the code ``c = ceil(v) - 1 + c_t`` is >= ``c_t``
exactly when ``v > 0``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradkit.compress import _native
from gradkit.compress._quant import _pack_codes, _unpack_codes

__all__ = ["bn_relu_conv", "apply_blpa", "remove_blpa", "blpa_units"]

log = logging.getLogger(__name__)

_WINDOW = 6.0  # the 6-standard-deviation window of the paper (±3 in x̂)


def _mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an NCHW tensor.

    torch.var_mean over (0, 2, 3) is ~20x slower than plain sums on CPU, so this sums shifted values
    block by block; shifting by the first sample's channel means keeps E[d²] - E[d]² free of
    cancellation when the mean is large compared with the spread.
    """
    shift = x[0].mean(dim=(1, 2)).view(1, -1, 1, 1)
    if _native_ok(x):
        s1, s2 = _native.moments(x, shift.view(-1).contiguous())
    else:
        s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        s2 = torch.zeros_like(s1)
        for sl in _blocks(x):
            d = x[sl] - shift
            s1 += d.sum(dim=(0, 2, 3), dtype=torch.float64)
            s2 += d.square_().sum(dim=(0, 2, 3), dtype=torch.float64)
    n = x.numel() / x.shape[1]
    m1 = s1 / n
    var = (s2 / n - m1 * m1).clamp_min_(0)
    return (m1.to(x.dtype) + shift.view(-1)), var.to(x.dtype)


def _native_ok(x: torch.Tensor, bits: int = 8) -> bool:
    """Whether the fused C kernels can run this unit: float32 NCHW on CPU, whole bytes per plane."""
    return (x.dtype == torch.float32 and x.dim() == 4 and (x.shape[2] * x.shape[3] * bits) % 8 == 0
            and _native.usable(x))


def _triton_ok(x: torch.Tensor, bits: int) -> bool:
    """Whether the fused Triton passes run this unit: CUDA tensors when triton imports (the tests route
    CPU tensors here under ``TRITON_INTERPRET=1`` by patching this function)."""
    if not x.is_cuda:
        return False
    from gradkit.compress import _device, _triton

    return _device.triton_enabled() and _triton.blpa_ok(x, bits)


def _batch_stats(x: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance used to normalise, updating running statistics as BatchNorm does."""
    use_batch = bn.training or bn.running_mean is None
    if not use_batch:
        assert bn.running_mean is not None and bn.running_var is not None
        return bn.running_mean, bn.running_var
    mean, var = _mean_var(x)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        assert bn.running_var is not None and bn.num_batches_tracked is not None
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = x.numel() / x.shape[1]
            bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
    return mean, var


# Elements per block of the elementwise passes (256 KiB of float32: stays in a core's cache).
_BLOCK_ELEMENTS = 65536


def _blocks(x: torch.Tensor) -> list[slice]:
    """Slices of whole samples along dim 0, about ``_BLOCK_ELEMENTS`` elements each."""
    if x.device.type != "cpu":  # one launch per pass on a GPU: cache blocks would be tiny kernels
        return [slice(None)]
    per_sample = max(1, x[0].numel()) if x.shape[0] else 1
    n = max(1, _BLOCK_ELEMENTS // per_sample)
    return [slice(i, i + n) for i in range(0, x.shape[0], n)]


def _outside(c_t: torch.Tensor, levels: int) -> bool:
    """Whether a channel's threshold lies outside the window. Asked on the CPU only: off it the answer
    would stall the host, so the fix-ups run on every channel there (see :func:`_host_decides`)."""
    if not _host_decides(c_t):
        return True
    return bool(((c_t < 1) | (c_t > levels)).any())


def _host_decides(t: torch.Tensor) -> bool:
    """Whether the torch path may read device values to skip work (yes on the CPU, where it is free)."""
    return t.device.type == "cpu"


def _fix_outside_codes(codes: torch.Tensor, above: torch.Tensor, c_t: torch.Tensor, levels: int) -> None:
    """Channels whose threshold lies outside the ±3 window keep the window for x̂ and reserve an end
    code for the far side of the threshold: code 0 means "at or below t" when t is below the window,
    code ``levels`` "above t" when t is above it. Rare, so done on those channels only (on the CPU;
    elsewhere on all channels with per-channel masks, without asking the host which)."""
    if not _host_decides(codes):
        low = (c_t < 1).view(1, -1, 1, 1)
        high = (c_t > levels).view(1, -1, 1, 1)
        fixed = torch.where(low, torch.where(above, codes.clamp_min(1), 0.0), codes)
        codes.copy_(torch.where(high, torch.where(above, float(levels), fixed.clamp_max(levels - 1)), fixed))
        return
    low = (c_t < 1).nonzero().flatten()
    if low.numel():
        sub = codes[:, low]
        codes[:, low] = torch.where(above[:, low], sub.clamp_min(1), torch.zeros_like(sub))
    high = (c_t > levels).nonzero().flatten()
    if high.numel():
        sub = codes[:, high]
        codes[:, high] = torch.where(above[:, high], torch.full_like(sub, levels), sub.clamp_max(levels - 1))


def _fix_outside_values(v: torch.Tensor, codes: torch.Tensor, c_t: torch.Tensor, levels: int) -> None:
    """Decode the reserved end codes of :func:`_fix_outside_codes` just across the threshold."""
    if not _host_decides(v):
        low = (c_t < 1).view(1, -1, 1, 1) & (codes == 0)
        high = (c_t > levels).view(1, -1, 1, 1) & (codes == levels)
        v.copy_(torch.where(low, -0.5, torch.where(high, 0.5, v)))
        return
    low = (c_t < 1).nonzero().flatten()
    if low.numel():
        v[:, low] = torch.where(codes[:, low] == 0, -0.5, v[:, low])
    high = (c_t > levels).nonzero().flatten()
    if high.numel():
        v[:, high] = torch.where(codes[:, high] == levels, 0.5, v[:, high])


def _torch_encode(
    x: Tensor, a_v: Tensor, b_v: Tensor, scale_y: Tensor, shift_y: Tensor, offset: Tensor, c_t: Tensor,
    bits: int,
) -> tuple[Tensor, Tensor, int]:
    """Conv input ``y`` and packed codes (with their bit width), in cache-sized torch blocks."""
    levels = 2**bits - 1
    outside = _outside(c_t, levels)
    y = torch.empty_like(x)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    # Cache blocking over samples: v lives only per block, y and the codes are written once.
    for sl in _blocks(x):
        v = torch.addcmul(b_v, x[sl], a_v)
        torch.addcmul(shift_y, v, scale_y, out=y[sl]).clamp_min_(0)
        above = v > 0 if outside else None
        c = v.ceil_().add_(offset).clamp_(0, levels)
        if above is not None:
            _fix_outside_codes(c, above, c_t, levels)
        codes[sl] = c
    if codes.numel() % (8 // bits):  # odd sizes keep one code per byte
        return y, codes.view(1, -1), 8
    return y, _pack_codes(codes.view(1, -1), bits), bits


def _native_encode(
    x: Tensor, a_v: Tensor, b_v: Tensor, scale_y: Tensor, shift_y: Tensor, offset: Tensor, c_t: Tensor,
    bits: int,
) -> tuple[Tensor, Tensor]:
    """:func:`_torch_encode` in one fused pass (``gk_blpa_encode``)."""
    av, bv, sy, hy, off, ct = (t.reshape(-1).float().contiguous() for t in (a_v, b_v, scale_y, shift_y, offset, c_t))
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    data = torch.empty(1, x.numel() * bits // 8, dtype=torch.uint8)
    _native.blpa_encode(x, av, bv, sy, hy, off, ct, bits, y, data)
    return y, data


class _TorchBackward:
    """The backward passes of one unit in cache-sized torch blocks; holds ``v`` (bin centres in v units)
    as a float tensor between them."""

    def __init__(self, data: Tensor, packed_bits: int, shape: torch.Size, centre: Tensor, c_t: Tensor,
                 bits: int) -> None:
        self.data, self.packed_bits, self.shape, self.c_t = data, packed_bits, shape, c_t
        self.centre = centre.view(1, -1, 1, 1)
        self.levels = 2**bits - 1
        self.v = torch.empty(shape, dtype=centre.dtype, device=data.device)

    def decode(self, scale_y: Tensor, shift_y: Tensor) -> Tensor:
        """The conv input ``y`` from the codes (filling ``v`` on the way)."""
        codes = _unpack_codes(self.data, self.packed_bits).view(self.shape)
        outside = _outside(self.c_t, self.levels)
        y = torch.empty_like(self.v)
        for sl in _blocks(self.v):
            vb = torch.sub(codes[sl], self.centre, out=self.v[sl])
            if outside:
                _fix_outside_values(vb, codes[sl], self.c_t, self.levels)
            torch.addcmul(shift_y, vb, scale_y, out=y[sl]).clamp_min_(0)
        return y

    def mask_sums(self, grad_y: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Applies the ReLU mask to ``grad_y`` in place; returns per-channel Σ g and Σ g·v."""
        dims = (0, 2, 3)
        sum_g = torch.zeros(self.shape[1], dtype=dtype, device=y.device)
        sum_gv = torch.zeros_like(sum_g)
        for sl in _blocks(self.v):
            gz = grad_y[sl].mul_(y[sl] > 0)
            sum_g += gz.sum(dims)
            sum_gv += (gz * self.v[sl]).sum(dims)
        return sum_g, sum_gv

    def grad_input(self, g: Tensor, xs: Tensor, xt: Tensor, m_g: Tensor, m_gx: Tensor, k: Tensor) -> None:
        """The BatchNorm input gradient ``(g - m_g - x̂·m_gx)·k``, in place on ``g``."""
        for sl in _blocks(self.v):
            xhat = torch.addcmul(xt, self.v[sl], xs)
            g[sl].sub_(m_g).sub_(xhat.mul_(m_gx)).mul_(k)


class _NativeBackward:
    """The backward passes of one unit on the fused kernels: v is re-read from the packed codes each
    time instead of being held as a float tensor."""

    def __init__(self, data: Tensor, shape: torch.Size, centre: Tensor, c_t: Tensor, bits: int) -> None:
        self.data, self.shape, self.bits = data, shape, bits
        self.centre = centre.reshape(-1).float().contiguous()
        self.c_t = c_t.reshape(-1).float().contiguous()

    def decode(self, scale_y: Tensor, shift_y: Tensor) -> Tensor:
        sy, hy = scale_y.reshape(-1).float().contiguous(), shift_y.reshape(-1).float().contiguous()
        y = torch.empty(self.shape)
        _native.blpa_decode(self.data, y, self.centre, self.c_t, sy, hy, self.bits)
        return y

    def mask_sums(self, grad_y: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Applies the ReLU mask to ``grad_y`` in place; returns per-channel Σ g and Σ g·v."""
        s1, s2 = _native.blpa_mask_sums(grad_y, y, self.data, self.centre, self.c_t, self.bits)
        return s1.to(dtype), s2.to(dtype)

    def grad_input(self, g: Tensor, xs: Tensor, xt: Tensor, m_g: Tensor, m_gx: Tensor, k: Tensor) -> None:
        """The BatchNorm input gradient ``(g - m_g - x̂·m_gx)·k``, in place on ``g``."""
        s, t, mg, mgx, kk = (v.reshape(-1).float().contiguous() for v in (xs, xt, m_g, m_gx, k))
        _native.blpa_grad_input(g, self.data, self.centre, self.c_t, s, t, mg, mgx, kk, self.bits)


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bn: nn.BatchNorm2d,
        conv: nn.Conv2d,
        bits: int,
    ) -> torch.Tensor:
        s = _WINDOW / 2**bits
        mean, var = _batch_stats(x, bn)
        batch_stats = bn.training or bn.running_mean is None
        invstd = torch.rsqrt(var + bn.eps)
        sign = torch.where(gamma < 0, -1.0, 1.0).to(x.dtype)
        absg = gamma.abs()
        zero = absg == 0
        t = torch.where(zero, torch.zeros_like(beta), -beta / absg.clamp_min(1e-30))
        # Code of the first bin above the threshold when the window is [-3, 3]; outside 1..levels
        # when the threshold lies outside the window (see _outside).
        c_t = torch.round((t + _WINDOW / 2) / s)
        shape = (1, -1, 1, 1)
        a_v = (sign * invstd / s).view(shape)
        b_v = ((-sign * mean * invstd - t) / s).view(shape)
        # ReLU input |γ|·s·v (β itself for a zero-γ channel): its sign is v's sign, bit for bit.
        scale_y = (absg * s).view(shape)
        shift_y = torch.where(zero, beta, torch.zeros_like(beta)).view(shape)
        offset = (c_t - 1).view(shape)
        ctx.native = _native_ok(x, bits)
        ctx.triton = not ctx.native and _triton_ok(x, bits)
        if ctx.native:
            y, data = _native_encode(x, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
            ctx.packed_bits = bits
        elif ctx.triton:
            from gradkit.compress import _triton

            y, data = _triton.blpa_encode(x, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
            ctx.packed_bits = bits
        else:
            y, data, ctx.packed_bits = _torch_encode(x, a_v, b_v, scale_y, shift_y, offset, c_t, bits)
        out = F.conv2d(y, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        del y
        ctx.bin_width = s
        ctx.bits = bits
        ctx.shape = x.shape
        ctx.batch_stats = batch_stats
        ctx.conv = (conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(data, weight, gamma, invstd, sign, t, c_t, scale_y, shift_y)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        data, weight, gamma, invstd, sign, t, c_t, scale_y, shift_y = ctx.saved_tensors
        s = ctx.bin_width
        shape = (1, -1, 1, 1)
        centre = c_t - 0.5
        passes: Any
        if ctx.native:
            passes = _NativeBackward(data, ctx.shape, centre, c_t, ctx.bits)
        elif ctx.triton:
            from gradkit.compress import _triton

            passes = _triton.BlpaPasses(data, ctx.shape, centre, c_t, ctx.bits)
        else:
            passes = _TorchBackward(data, ctx.packed_bits, ctx.shape, centre, c_t, ctx.bits)
        y = passes.decode(scale_y, shift_y)
        stride, padding, dilation, groups = ctx.conv
        need_x, need_g, need_b, need_w, need_bias = ctx.needs_input_grad[:5]
        grad_y, grad_w, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, y, weight, [weight.shape[0]] if ctx.has_bias else None,
            stride, padding, dilation, False, [0, 0], groups,
            [need_x or need_g or need_b, need_w, need_bias and ctx.has_bias],
        )
        grad_x = grad_gamma = grad_beta = None
        if grad_y is not None:
            # Exact mask: y > 0 exactly when the code is above c_t.
            grad_y = grad_y.contiguous()
            sum_g, sum_gv = passes.mask_sums(grad_y, y, gamma.dtype)
            del y
            grad_z = grad_y
            # x̂ = sign·(t + s·v), so Σ g·x̂ follows from Σ g and Σ g·v.
            sum_gxhat = sign * (t * sum_g + s * sum_gv)
            grad_gamma = sum_gxhat if need_g else None
            grad_beta = sum_g if need_b else None
            if need_x:
                k = (gamma * invstd).view(shape)
                if ctx.batch_stats:
                    n = grad_z.numel() / grad_z.shape[1]
                    # dx = γ/σ · (g - mean(g) - x̂·mean(g·x̂)), the BatchNorm backward, in place.
                    m_g = (sum_g / n).view(shape)
                    m_gx = (sum_gxhat / n).view(shape)
                    xs, xt = (sign * s).view(shape), (sign * t).view(shape)
                    passes.grad_input(grad_z, xs, xt, m_g, m_gx, k)
                    grad_x = grad_z
                else:
                    grad_x = grad_z.mul_(k)
        return grad_x, grad_gamma, grad_beta, grad_w, grad_bias, None, None, None


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, bits: int) -> torch.Tensor:
    """``conv(relu(bn(x)))`` with BLPA storage for backward (plain modules when no gradient is needed)."""
    if not torch.is_grad_enabled() or bn.weight is None or bn.bias is None:
        return conv(F.relu(bn(x)))
    return _BNReLUConv.apply(x, bn.weight, bn.bias, conv.weight, conv.bias, bn, conv, bits)


def _blpa_unit(x: torch.Tensor, norm: nn.Module, relu: nn.Module, conv: nn.Module, *, bits: int) -> torch.Tensor:
    """A residual block's ``unit`` (see ``gradkit.models.resnet``) computed by :func:`bn_relu_conv`."""
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
    return bn_relu_conv(x, norm, conv, bits)


def blpa_units(model: nn.Module) -> list[tuple[str, Any]]:
    """The residual blocks of ``model`` whose BatchNorm -> ReLU -> Conv units the faithful path handles.

    These are gradkit's ``BasicBlock`` (bn1 -> relu1 -> conv2) and ``Bottleneck`` (two units), with
    BatchNorm (not identity) norms. Other layers go through the generic path.
    """
    from gradkit.models.resnet import BasicBlock, Bottleneck  # models import nothing from compress

    units: list[tuple[str, Any]] = []
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock | Bottleneck) and isinstance(m.bn1, nn.BatchNorm2d):
            units.append((name, m))
    return units


def apply_blpa(model: nn.Module, bits: int) -> int:
    """Route the residual blocks of ``model`` through :func:`bn_relu_conv`; returns how many.

    The blocks keep their modules, parameters and ``state_dict`` keys; only their ``unit`` (the one
    extension point of a residual block) changes (undo with :func:`remove_blpa`).
    """
    units = blpa_units(model)
    for _, block in units:
        block.unit = functools.partial(_blpa_unit, bits=bits)
    if not units:
        log.info("no BatchNorm->ReLU->Conv residual blocks found; every tensor uses the generic path")
    return len(units)


def remove_blpa(model: nn.Module) -> None:
    """Undo :func:`apply_blpa`."""
    for _, block in blpa_units(model):
        block.__dict__.pop("unit", None)
