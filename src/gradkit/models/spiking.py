"""``snn``: a spiking network (leaky integrate-and-fire) with rate-coded input.

Backprop needs a surrogate for the spike's derivative (zero almost everywhere); like snnTorch we use
the fast sigmoid ``1 / (1 + k|v - θ|)²`` (Zenke & Ganguli, 2018). The likelihood-ratio method
(Jiang et al., ICLR 2024) needs none: noise goes on each layer's membrane input (the Linear/conv output
at every time step), and the spike function is only ever evaluated, never differentiated.

Layout: ``encode`` (deterministic rate coding over ``steps`` time steps), ``fc1``.. (Linear + LIF; or
conv + LIF + pool with ``conv=True``), ``head`` (Linear read-out averaged over time, as logits).
Tensors carry time as dim 1: ``(N, T, ...)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.models._layers import positive_ints
from gradkit.models._registry import MODELS

__all__ = ["snn", "LIF", "RateEncoder", "SpikeFn", "TimeDistributed"]


class SpikeFn(torch.autograd.Function):
    """Heaviside spike with a fast-sigmoid surrogate derivative (used only by backprop)."""

    backward_calls = 0
    """How many times the surrogate was used (tests check ULR never uses it)."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, slope: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        ctx.slope = slope
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        SpikeFn.backward_calls += 1
        (v,) = ctx.saved_tensors
        return grad / (1 + ctx.slope * v.abs()) ** 2, None


class RateEncoder(nn.Module):
    """Deterministic rate coding: each input is scaled to [0, 1] per sample (so any normalisation
    works) and fires ``floor(T·p)`` evenly spaced spikes over ``T`` steps.

    Deterministic, so that noisy copies and their clean baseline see the same spike trains.
    """

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        lo = flat.amin(1, keepdim=True)
        hi = flat.amax(1, keepdim=True)
        p = ((flat - lo) / (hi - lo).clamp_min(1e-6)).reshape(x.shape)
        t = torch.arange(self.steps + 1, device=x.device, dtype=x.dtype).view(-1, *([1] * x.dim()))
        phase = torch.floor(t * p.unsqueeze(0))
        spikes = phase[1:] - phase[:-1]  # (T, N, ...)
        return spikes.transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


class LIF(nn.Module):
    """Leaky integrate-and-fire over time (dim 1): ``v ← βv + I_t``, spike when ``v > θ``, reset by
    subtraction. Has no parameters; ULR perturbs its input current, so it is never differentiated."""

    def __init__(self, beta: float = 0.9, threshold: float = 1.0, slope: float = 25.0) -> None:
        super().__init__()
        self.beta, self.threshold, self.slope = beta, threshold, slope

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(current[:, 0])
        out = []
        for t in range(current.shape[1]):
            v = self.beta * v + current[:, t]
            s = SpikeFn.apply(v - self.threshold, self.slope)
            # Reset by subtraction, through the spike's value only (as snnTorch's reset_mechanism).
            v = v - s.detach() * self.threshold
            out.append(s)
        return torch.stack(out, dim=1)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}"


class TimeDistributed(nn.Module):
    """Apply ``module`` to every time step at once by folding time into the batch: (N, T, ...)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        y = self.module(x.reshape(n * t, *x.shape[2:]))
        return y.reshape(n, t, *y.shape[1:])


class _MeanOverTime(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class _FlattenTime(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


@MODELS.register("snn", help="spiking MLP (or conv) of LIF neurons, rate-coded input; bp uses a surrogate")
def snn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[int] = (256,),
    steps: int = 8,
    conv: bool = False,
    channels: Sequence[int] = (16, 32),
    beta: float = 0.9,
) -> nn.Sequential:
    """Spiking network for images.

    Args:
        input_shape: ``(C, H, W)`` (or any shape for the MLP).
        num_classes: output logits (mean read-out current over time).
        hidden: widths of the spiking Linear layers.
        steps: time steps T of the rate code.
        conv: use spiking 3x3 conv blocks (``channels``, each + LIF + 2x2 max-pool) before the Linear layers.
        channels: conv widths when ``conv``.
        beta: membrane leak factor.
    """
    widths = positive_ints("snn", "hidden", hidden)
    (steps,) = positive_ints("snn", "steps", steps)
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["encode"] = RateEncoder(steps)
    shape = tuple(input_shape)
    if conv:
        c, h, w = shape
        for i, ch in enumerate(positive_ints("snn", "channels", channels), start=1):
            blocks[f"conv{i}"] = nn.Sequential(OrderedDict(
                conv=TimeDistributed(nn.Conv2d(c, ch, 3, padding=1)),
                lif=LIF(beta),
                pool=TimeDistributed(nn.MaxPool2d(2)),
            ))
            c, h, w = ch, h // 2, w // 2
        shape = (c, h, w)
    features = math.prod(shape)
    for i, width in enumerate(widths, start=1):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if i == 1:
            layers["flatten"] = _FlattenTime()
        # Linear acts on the last dim, so (N, T, F) needs no folding.
        layers["fc"] = nn.Linear(features, width)
        layers["lif"] = LIF(beta)
        blocks[f"fc{i}"] = nn.Sequential(layers)
        features = width
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if not widths:
        head["flatten"] = _FlattenTime()
    head["fc"] = nn.Linear(features, num_classes)
    head["readout"] = _MeanOverTime()
    blocks["head"] = nn.Sequential(head)
    return nn.Sequential(blocks)
