"""``forward-grad``: forward gradients (Baydin et al., 2022), a forward-only peer of ULR.

For a random direction ``v ~ N(0, I)`` over all weights, one forward-mode JVP (``torch.func.jvp``)
gives the directional derivative ``∇L·v`` exactly, and ``(∇L·v) v`` is an unbiased gradient estimate.
Averaging over ``directions`` reduces its variance; each JVP costs about one forward pass (with dual
numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradkit.methods._base import LossFn
from gradkit.methods._directional import DirectionalEstimator, eval_mode_after_clean_pass
from gradkit.methods._registry import METHODS
from gradkit.optim import OptimizerFactory

__all__ = ["ForwardGradient"]


@METHODS.register("forward-grad", help="forward gradients: JVP along random directions (torch.func.jvp)")
class ForwardGradient(DirectionalEstimator):
    """Forward-gradient descent: ``g = mean_k (∇L·v_k) v_k``.

    Options: ``directions`` (default 1).
    """

    name = "forward-grad"

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        directions: int = 1,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, directions=directions)
        self._model = nn.Sequential(*self.stages)
        self._names = [n for n, p in self._model.named_parameters() if p.requires_grad]

    @property
    def forward_passes(self) -> int:
        """JVPs per step (each about one forward pass)."""
        return self.directions

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` with the estimate without stepping; returns the clean loss."""
        primals = tuple(p.detach() for p in self._params)

        def loss_of(*params: torch.Tensor) -> torch.Tensor:
            out = functional_call(self._model, dict(zip(self._names, params, strict=True)), (x,))
            return self.loss_fn(out, y)

        grads = [torch.zeros_like(p) for p in self._params]
        # The fused attention kernels (flash, memory-efficient) have no forward-mode derivative; the
        # math form of scaled_dot_product_attention is made of ops that have one.
        with eval_mode_after_clean_pass(self, x, y) as loss, sdpa_kernel(SDPBackend.MATH):
            for _ in range(self.directions):
                tangents = tuple(torch.randn_like(p) for p in primals)
                slope = jvp(loss_of, primals, tangents)[1]
                for g, v in zip(grads, tangents, strict=True):
                    g.add_(v, alpha=float(slope) / self.directions)
        for p, g in zip(self._params, grads, strict=True):
            p.grad = g
        return loss
