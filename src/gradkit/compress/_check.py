"""How far the gradients of a compressed step are from exact ones, layer by layer."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress._modes import Activations
from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy

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


def require_one_input(model: nn.Module, who: str) -> None:
    """Raise a one-line :class:`ConfigError` if ``model(x)`` cannot run: its forward needs more than
    the input (a model that takes targets and computes its own loss)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin forward: let the call itself complain
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    if len(required) > 1:
        raise ConfigError(
            f"{who} runs model(x) and scores it with loss_fn, but {type(model).__name__}.forward needs "
            f"{', '.join(required)}: pass a module whose forward(x) returns the logits, and the loss as loss_fn"
        )


def check_gradients(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    seed: int = 0,
    **options: object,
) -> list[LayerGradient]:
    """Per-layer cosine and relative error of ``mode``'s gradients against exact training.

    Runs one forward+backward on ``batch`` with two copies of ``model`` (the model itself is not
    touched), one exact and one under ``mode`` (any name of ``--activations``). ``model(x)`` must return
    what ``loss_fn`` scores: logits, for the default per-example or per-token cross-entropy.

    Raises:
        ConfigError: the model's forward needs more than ``x`` (it takes targets), or its output does
            not fit the default loss (a tuple, a loss, logits of the wrong shape for ``y``).

    Example:
        >>> worst = min(check_gradients(model, (x, y), "blpa4"), key=lambda r: r.cosine)
    """
    x, y = batch
    require_one_input(model, "check_gradients")
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
