"""Hybrid ULR + backprop ("graph rearrangement", Jiang et al., ICLR 2024, Sec. on hybrid training).

Noise goes only at stage boundaries. For boundary ``s`` (the output ``h_s`` of stage ``s``), noisy copies
of ``h_s`` run through the later stages (forward only) and give ``G_s = Σ (L - b) ε / σ``, an estimate of
``∂L/∂h_s``. Stage ``s`` then backpropagates ``G_s`` through itself only: the gradient of the surrogate
``Σ_n w_n log N(h̃_n; f(x_n; W), σ²)``. No gradient crosses a boundary, so each stage computes its
gradient from its own input and its own ``G_s``, independently of the others (no backward locking).

The last stage's boundary is the loss itself, so it backpropagates the exact loss unless
``output_noise=True`` puts noise on the model's output too (then one stage equals the plain estimator
with noise only at the output layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.likelihood_ratio.engine import LossFn, per_layer, per_sample_loss, repeat_copies
from gradkit.likelihood_ratio.noise import draw_noise
from gradkit.models._layers import has_eval_modules
from gradkit.pipeline.shared import accumulate_grad

__all__ = ["HybridEstimator"]


class HybridEstimator:
    """Fills ``.grad`` of every stage from boundary noise plus backprop inside each stage.

    Args:
        stages: the model's consecutive partitions.
        loss_fn: accepts ``reduction='none'``.
        copies, sigma: per noisy boundary (one value, or one per boundary).
        baseline: ``clean``, ``antithetic`` or ``none``.
        sampler: ``normal`` or ``qmc``.
        output_noise: noise at the model's output as well (the last stage then gets an estimate, not
            the exact loss gradient).
        memory_budget_mb: bound on one chunk of stacked copies.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        loss_fn: LossFn,
        *,
        copies: Any = 64,
        sigma: Any = 0.01,
        baseline: str = "clean",
        sampler: str = "normal",
        output_noise: bool = False,
        memory_budget_mb: float = 256.0,
    ) -> None:
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.output_noise = output_noise
        n = len(self.stages) - (0 if output_noise else 1)
        if n < 1:
            raise ConfigError("the hybrid mode needs --stages >= 2, or output_noise=true with one stage")
        names = [f"stage{s + 1}_output" for s in range(n)]
        self.copies = per_layer(copies, n, "copies", names, int)
        self.sigma = per_layer(sigma, n, "sigma", names, float)
        self.baseline, self.sampler, self.budget = baseline, sampler, memory_budget_mb
        if baseline == "antithetic" and any(c % 2 for c in self.copies):
            raise ConfigError(f"baseline=antithetic needs an even number of copies, got copies={copies}")
        self.has_eval_modules = has_eval_modules(self.stages)
        self.forward_passes = 0.0

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` for one batch; returns the clean training loss."""
        with torch.no_grad():
            hs = self._forward(x)
            loss = per_sample_loss(self.loss_fn, hs[-1], y).mean().item()
        modes = [(m, m.training) for stage in self.stages for m in stage.modules()]
        for stage in self.stages:
            stage.eval()
        try:
            with torch.no_grad():
                if self.has_eval_modules:
                    hs = self._forward(x)
                ref = per_sample_loss(self.loss_fn, hs[-1], y)
            # Clean pass(es), plus the stages' own forwards for their local backprop.
            self.forward_passes = (2.0 if self.has_eval_modules else 1.0) + 1.0
            # Every stage adds its part: a parameter two stages use (a tied embedding) gets the sum.
            for p in self._params():
                p.grad = None
            for s in range(len(self.stages)):
                g = self.boundary_grad(s, hs, y, ref) if s < len(self.copies) else None
                self.stage_backward(s, hs[s], y, g)
            for p in self._params():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        finally:
            for m, training in modes:
                m.training = training
        return loss

    def boundary_grad(self, s: int, hs: list[torch.Tensor], y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Estimate of ``∂L/∂h_s`` (mean loss) from noisy copies of stage ``s``'s output."""
        copies, sigma = self.copies[s], self.sigma[s]
        h, batch = hs[s + 1], y.shape[0]
        later = self.stages[s + 1 :]
        per_copy = 16 * sum(t.numel() for t in hs[s + 1 :])
        chunk = min(copies, max(1, int(self.budget * 2**20 // max(per_copy, 1))))
        if self.baseline == "antithetic":
            chunk = max(2, chunk - chunk % 2)
        g = torch.zeros_like(h)
        done = 0
        with torch.no_grad():
            while done < copies:
                c = min(chunk, copies - done)
                eps = draw_noise(c, batch, tuple(h.shape[1:]), sampler=self.sampler,
                                 antithetic=self.baseline == "antithetic", device=h.device)
                out = repeat_copies(h, c) + sigma * eps.reshape(c * batch, *h.shape[1:])
                for stage in later:
                    out = stage(out)
                w = per_sample_loss(self.loss_fn, out, repeat_copies(y, c)).view(c, batch)
                if self.baseline == "clean":
                    w = w - ref.view(1, batch)
                g += (w.view(c, batch, *([1] * (eps.dim() - 2))) * eps).sum(0)
                # Counted as full forwards, although a copy re-runs only the later stages.
                self.forward_passes += c
                done += c
        return g / (copies * batch * sigma)

    def stage_backward(self, s: int, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None) -> None:
        """Backprop inside stage ``s`` only: ``g`` into its output, or the exact loss for the last stage;
        the gradients are added to ``.grad`` (a shared parameter collects every stage's part)."""
        stage = self.stages[s]
        params = [p for p in stage.parameters() if p.requires_grad]
        if not params:
            return
        with torch.enable_grad():
            out = stage(x.detach())
            if g is None:
                grads = torch.autograd.grad(self.loss_fn(out, y), params, allow_unused=True)
            else:
                grads = torch.autograd.grad(out, params, g, allow_unused=True)
        for p, gr in zip(params, grads, strict=True):
            accumulate_grad(p, gr)

    def _params(self) -> list[nn.Parameter]:
        return [p for p in nn.ModuleList(self.stages).parameters() if p.requires_grad]  # each once

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hs = [x]
        for stage in self.stages:
            hs.append(stage(hs[-1]))
        return hs
