"""Per-layer cosine similarity between a method's gradient estimate and the true backprop gradient.

The diagnostic of Jiang et al. (ICLR 2024, Fig. 7), for any method with an ``estimate(x, y)`` that fills
``.grad`` without stepping (``ulr``, ``es``, ``spsa``, ``forward-grad``). The reference is backprop of the
same function the estimate differentiates: after the estimate's clean pass updated BatchNorm's running
statistics, in eval mode (the noisy copies run BatchNorm on running statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gradkit import methods as _methods
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, Dataset, load_dataset
from gradkit.errors import ConfigError
from gradkit.likelihood_ratio.layers import find_layers
from gradkit.models import build_model
from gradkit.stages import split

__all__ = ["LayerCosine", "diagnose"]


@dataclass(frozen=True)
class LayerCosine:
    """One layer's agreement with backprop."""

    name: str
    params: int
    cosine: float
    relative_norm: float
    """``‖estimate‖ / ‖true gradient‖``."""


def diagnose(config: TrainConfig, *, dataset: Dataset | None = None, repeats: int = 1) -> dict[str, Any]:
    """Cosines per layer (averaged over ``repeats`` independent estimates) on the first training batch.

    Raises:
        ConfigError: the method has no ``estimate`` (e.g. ``bp``, which would be exact).
    """
    torch.manual_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config.data, config.data_dir, download=config.download,
                               limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed,
                               options=config.data_options)
    loader = BatchLoader(dataset.train_x, dataset.train_y, dataset.info, config.batch_size, train=True, seed=config.seed)
    x, y = next(iter(loader.epoch(0)))
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.info.input_shape, dataset.info.num_classes,
                        **{**dataset.model_args, **config.model_options})
    # The loop's split, except that "time" (profiled, machine-dependent) falls back to "params".
    balance = "params" if config.balance == "time" else config.balance
    stages = split(model, config.stages, balance=balance) if config.stages > 1 else [model]
    method = _methods.build(config.method, stages, optimizer=config.optimizer_config().factory(),
                            **config.method_options)
    if not hasattr(method, "estimate"):
        raise ConfigError(f"diagnose compares an estimate with backprop; method {config.method!r} has none "
                          "(use ulr, es, spsa or forward-grad)")
    method.train()
    layers = find_layers(stages)
    sums = [0.0] * len(layers)
    norms = [0.0] * len(layers)
    for r in range(repeats):
        torch.manual_seed(config.seed + r)
        method.estimate(x, y)  # type: ignore[attr-defined]
        estimate = [[_grad(p) for _, p in layer.params()] for layer in layers]
        truth = _true_grads(method, layers, x, y)
        for i, (est, tru) in enumerate(zip(estimate, truth, strict=True)):
            e, t = torch.cat([g.flatten() for g in est]), torch.cat([g.flatten() for g in tru])
            sums[i] += float(F.cosine_similarity(e, t, dim=0))
            norms[i] += float(e.norm() / t.norm().clamp_min(1e-12))
    rows = [
        LayerCosine(layer.name, sum(p.numel() for _, p in layer.params()), sums[i] / repeats, norms[i] / repeats)
        for i, layer in enumerate(layers)
    ]
    passes = getattr(getattr(method, "estimator", method), "forward_passes", None)
    return {
        "method": config.method,
        "model": config.model,
        "data": config.data,
        "batch_size": int(y.shape[0]),
        "stages": config.stages,
        "options": config.method_options,
        "repeats": repeats,
        "forward_passes": None if passes is None or (isinstance(passes, float) and math.isnan(passes)) else passes,
        "layers": [vars(r) for r in rows],
    }


def _true_grads(method: Any, layers: list, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    modes = [(m, m.training) for s in method.stages for m in s.modules()]
    method.eval()
    try:
        for s in method.stages:
            s.zero_grad(set_to_none=True)
        with torch.enable_grad():
            method.loss_fn(method.forward(x), y).backward()
        return [[_grad(p) for _, p in layer.params()] for layer in layers]
    finally:
        for m, training in modes:
            m.training = training


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
