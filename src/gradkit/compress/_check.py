"""How far the gradients of a compressed step are from exact ones, layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress._modes import Activations

__all__ = ["LayerGradient", "check_gradients"]


@dataclass(frozen=True)
class LayerGradient:
    """Gradient agreement of one layer (a module with its own parameters, all of them concatenated)."""

    name: str
    cosine: float
    """Cosine similarity between the compressed and the exact gradient."""
    rel_error: float
    """``|g - g_exact| / |g_exact|``."""


def _layer_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, module in model.named_modules():
        own = [p.grad.reshape(-1) for p in module.parameters(recurse=False) if p.grad is not None]
        if own:
            grads[name] = torch.cat(own)
    return grads


def check_gradients(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    seed: int = 0,
    **options: object,
) -> list[LayerGradient]:
    """Per-layer cosine and relative error of ``mode``'s gradients against exact training.

    Runs one forward+backward on ``batch`` with two copies of ``model`` (the model itself is not
    touched), one exact and one under ``mode`` (any name of ``--activations``).

    Example:
        >>> worst = min(check_gradients(model, (x, y), "blpa4"), key=lambda r: r.cosine)
    """
    x, y = batch
    results = []
    grads = []
    for m in ("exact", mode):
        clone = copy.deepcopy(model)
        clone.train()
        act = Activations(clone, m, **options)
        torch.manual_seed(seed)
        with act:
            loss = loss_fn(clone(x), y)
        loss.backward()
        act.close()
        grads.append(_layer_grads(clone))
    exact, approx = grads
    for name, g in exact.items():
        a = approx[name]
        cos = F.cosine_similarity(a, g, dim=0, eps=1e-30).item()
        rel = ((a - g).norm() / g.norm().clamp_min(1e-30)).item()
        results.append(LayerGradient(name, cos, rel))
    return results
