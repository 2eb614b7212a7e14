"""How good is a method's update direction? The sufficient-direction constant σ of Features Replay.

Huo et al. (NeurIPS 2018, Assumption 1 and Fig. 3) show convergence when the FR direction g satisfies
<∇f(w), g> >= σ ||∇f(w)||² for some σ > 0. Reviewers asked how σ was computed; here it is, on a
training step of any method:

* ∇f is the true backprop gradient of the whole network on the step's mini-batch at the weights
  before the step (computed on the side: BatchNorm running statistics and the RNG are left as they
  were, and no ``.grad`` is touched);
* g is the concatenation of the raw gradients the method applies during the step (``p.grad`` just
  before each optimizer step; momentum and weight decay are not included); a stage that does not
  update in this step contributes zeros.

σ = <∇f, g> / ||∇f||² and cos = <∇f, g> / (||∇f|| ||g||). Backprop gives σ = cos = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradkit.devices import fork_rng
from gradkit.methods import Method
from gradkit.pipeline.batchnorm import frozen_running_stats

__all__ = ["DirectionSample", "measure_direction", "true_gradient"]


@dataclass(frozen=True)
class DirectionSample:
    """σ and cosine of one step."""

    sigma: float
    cosine: float


def true_gradient(method: Method, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The backprop gradient of ``method.loss_fn`` on (x, y) for ``method.parameters()``, without side
    effects on the weights, their ``.grad``, BatchNorm statistics or the random number generators."""
    params = method.parameters()
    with fork_rng(x.device), frozen_running_stats(nn.ModuleList(method.stages)):
        loss = method.loss_fn(method.forward(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]


def measure_direction(
    method: Method, x: torch.Tensor, y: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
) -> tuple[float, DirectionSample | None]:
    """Run one training step of ``method`` on (x, y) and measure its update direction.

    ``step`` runs the step (default ``method.step``; e.g. wrapped by ``Activations.wrap``); the true
    gradient is always computed with exact activations.

    Returns:
        The step's loss and the sample; None when no stage updated (pipeline warm-up) or ∇f is 0.
    """
    reference = true_gradient(method, x, y)
    params = method.parameters()
    applied: dict[int, torch.Tensor] = {}

    def observe(stage: int, batch: int, updated: Sequence[nn.Parameter]) -> None:
        for p in updated:
            if p.grad is not None:
                applied[id(p)] = p.grad.detach().clone()

    method.update_observers.append(observe)
    try:
        loss = (step or method.step)(x, y)
    finally:
        method.update_observers.remove(observe)
    dot = norm_f = norm_g = 0.0
    for p, f in zip(params, reference, strict=True):
        g = applied.get(id(p))
        norm_f += float(f.double().pow(2).sum())
        if g is not None:
            dot += float((f.double() * g.double()).sum())
            norm_g += float(g.double().pow(2).sum())
    if norm_f == 0.0 or norm_g == 0.0:
        return loss, None
    return loss, DirectionSample(sigma=dot / norm_f, cosine=dot / math.sqrt(norm_f * norm_g))
