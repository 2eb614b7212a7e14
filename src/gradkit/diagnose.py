"""Per-layer cosine similarity between a method's gradient estimate and the true backprop gradient.

The diagnostic of Jiang et al. (ICLR 2024, Fig. 7), for any method with an ``estimate(x, y)`` that fills
``.grad`` without stepping (``ulr``, ``es``, ``spsa``, ``forward-grad``). The reference is backprop of the
same function the estimate differentiates: after the estimate's clean pass updated BatchNorm's running
statistics, in eval mode (the noisy copies run BatchNorm on running statistics).

With a low-bit ``activations`` mode it checks backprop under that mode against exact backprop instead
(:func:`gradkit.compress.check_gradients`). Either check can run at trained weights (``weights``: a
finished run's folder or its ``model.pt``) or after ``train_steps`` of exact backprop: a low-bit mode that
agrees at initialisation can disagree once attention has sharpened (issue 14: int2 on a GPT, cosine 0.997
at initialisation, 0.57 after 300 steps without the attention rule).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradkit import methods as _methods
from gradkit.compress import GradientCheck, check_gradients, load_weights, pretrain
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


def diagnose(config: TrainConfig, *, dataset: Dataset | None = None, repeats: int = 1,
             weights: str | Path | None = None, train_steps: int = 0) -> dict[str, Any]:
    """Cosines per layer (averaged over ``repeats`` independent estimates) on the first training batch.

    Args:
        config: what to check: the method's estimate, or, when ``config.activations`` is a low-bit mode,
            backprop under that mode (``method`` must then be ``bp``).
        dataset: the loaded dataset (default: load ``config.data``).
        repeats: independent estimates averaged.
        weights: check at these trained weights: a finished run's folder or a ``model.pt`` of the same
            model.
        train_steps: first train the model this many steps of exact backprop (``config``'s optimizer and
            learning rate, constant) on the batches after the checked one.

    Raises:
        ConfigError: the method has no ``estimate`` (e.g. ``bp``, which would be exact) and no low-bit
            activations are checked; ``train_steps`` < 0; weights missing.
    """
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ConfigError(f"--train-steps must be an integer >= 0, got {train_steps!r}")
    lowbit = config.activations != "exact"
    if lowbit and config.method != "bp":
        raise ConfigError(f"diagnose --activations {config.activations} checks backprop under that mode against "
                          f"exact backprop; leave out --method {config.method} (or give --method bp)")
    torch.manual_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config.data, config.data_dir, download=config.download,
                               limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed,
                               options=config.data_options)
    loader = BatchLoader(dataset.train_x, dataset.train_y, dataset.info, config.batch_size, train=True, seed=config.seed)
    batches = _batches(loader)
    x, y = next(batches)
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.info.input_shape, dataset.info.num_classes,
                        **{**dataset.model_args, **config.model_options})
    trained: dict[str, Any] = {"weights": None if weights is None else str(weights), "train_steps": 0}
    if weights is not None:
        load_weights(model, weights)
    if train_steps:
        trained["train_steps"] = pretrain(model, batches, train_steps,
                                          optimizer=config.optimizer_config().factory())
    if lowbit:
        torch.manual_seed(config.seed)
        checked = check_gradients(model, (x, y), config.activations, seed=config.seed,
                                  group_size=config.activation_group_size, attention_bits=config.attention_bits)
        summary = GradientCheck.of(trained["train_steps"], checked)
        return {
            "check": "activations",
            "activations": config.activations,
            "attention_bits": config.attention_bits,
            "model": config.model,
            "data": config.data,
            "batch_size": int(y.shape[0]),
            **trained,
            "median_cosine": summary.median,
            "min_cosine": summary.min,
            "worst_layer": summary.worst,
            "layers": [vars(r) for r in checked],
        }
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
        "check": "estimate",
        **trained,
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


def _batches(loader: BatchLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch (``--train-steps`` may outlast one epoch)."""
    return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())


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
