"""How far the gradients of a compressed step are from exact ones, layer by layer, also once trained.

A check at initialisation can hide what training brings out: int2 on a 4-layer GPT agreed with exact
gradients at initialisation (median per-layer cosine 0.997) and not after 300 steps (0.57), because
attention sharpens as it learns (:mod:`._rules`). So :func:`check_gradients` takes trained weights
(``weights=``: a state dict or a finished run's folder) or trains a copy first (``steps=``), and
:func:`track_gradients` follows the agreement over a training run.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradkit.compress._modes import Activations
from gradkit.errors import ConfigError, DataError
from gradkit.losses import cross_entropy

__all__ = ["GradientCheck", "LayerGradient", "check_gradients", "load_weights", "pretrain", "track_gradients"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LayerGradient:
    """Gradient agreement of one layer (a module with its own parameters, all of them concatenated)."""

    name: str
    cosine: float
    """Cosine similarity between the compressed and the exact gradient."""
    rel_error: float
    """``|g - g_exact| / |g_exact|``."""


@dataclass(frozen=True)
class GradientCheck:
    """The per-layer agreement of one check, summarised (what :func:`track_gradients` returns per check)."""

    step: int
    """Training steps taken before the check."""
    median: float
    """Median over layers of the cosine with the exact gradient."""
    min: float
    worst: str
    """The layer with the lowest cosine."""
    layers: list[LayerGradient] = field(repr=False)

    @classmethod
    def of(cls, step: int, layers: list[LayerGradient]) -> GradientCheck:
        worst = min(layers, key=lambda r: r.cosine)
        return cls(step, statistics.median(r.cosine for r in layers), worst.cosine, worst.name, layers)

    def to_dict(self) -> dict[str, object]:
        return {"step": self.step, "median_cosine": round(self.median, 4), "min_cosine": round(self.min, 4),
                "worst_layer": self.worst}


def load_weights(model: nn.Module, weights: Mapping[str, Any] | str | Path) -> None:
    """Load trained ``weights`` into ``model``: a state dict, a ``model.pt``, or the folder of a finished
    ``gradkit train`` run (its ``model.pt``).

    Raises:
        ConfigError: no such file, or a run folder without ``model.pt`` (the run did not finish).
        DataError: the weights do not fit ``model``.
    """
    if not isinstance(weights, Mapping):
        from gradkit.checkpoint import load_checkpoint
        from gradkit.run_folder import RunFolder

        path = Path(weights)
        if path.is_dir():
            path = RunFolder(path).model_path
            if not path.is_file():
                raise ConfigError(f"{weights} has no model.pt (the run did not finish); finish it with "
                                  "--resume, or give a model.pt")
        elif not path.is_file():
            raise ConfigError(f"no weights at {weights}; give a run folder or its model.pt")
        weights = load_checkpoint(path)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the weights do not fit this model ({first[:160]}); give weights of the same "
                        "model and options") from None


def _optimizer(model: nn.Module, factory: OptimizerFactory | None) -> torch.optim.Optimizer:
    return (factory or (lambda ps: torch.optim.Adam(ps, lr=1e-3)))(model.parameters())


def pretrain(model: nn.Module, batches: Iterable[Batch], steps: int, *, loss_fn: LossFn = cross_entropy,
             optimizer: OptimizerFactory | None = None, mode: str = "exact", **options: Any) -> int:
    """Train ``model`` in place for ``steps`` backprop steps on ``batches`` (default Adam, lr 1e-3), so that
    a gradient check sees trained weights; returns the steps taken (fewer if batches run out).

    ``mode`` (and ``options``, as :class:`Activations` takes them) trains under an ``--activations``
    mode, e.g. to check the weights that int2 training itself reaches."""
    return _train(model, batches, steps, loss_fn, _optimizer(model, optimizer), mode, options)


def _train(model: nn.Module, batches: Iterable[Batch], steps: int, loss_fn: LossFn,
           opt: torch.optim.Optimizer, mode: str = "exact", options: Mapping[str, Any] | None = None) -> int:
    model.train()
    act = Activations(model, mode, **(options or {}))
    taken = 0
    try:
        for x, y in itertools.islice(batches, steps):
            opt.zero_grad(set_to_none=True)
            with act:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            taken += 1
    finally:
        act.close()
    opt.zero_grad(set_to_none=True)
    return taken


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
    batch: Batch,
    mode: str,
    *,
    loss_fn: LossFn = cross_entropy,
    seed: int = 0,
    weights: Mapping[str, Any] | str | Path | None = None,
    steps: int = 0,
    batches: Iterable[Batch] | None = None,
    optimizer: OptimizerFactory | None = None,
    **options: object,
) -> list[LayerGradient]:
    """Per-layer cosine and relative error of ``mode``'s gradients against exact training.

    Runs one forward+backward on ``batch`` with two copies of ``model`` (the model itself is not
    touched), one exact and one under ``mode`` (any name of ``--activations``), at ``model``'s weights,
    or at trained ones: a check at initialisation can pass where a trained model fails (int2 on a GPT:
    cosine 0.997 at initialisation, 0.57 after 300 steps without the attention rule). ``model(x)`` must
    return what ``loss_fn`` scores: logits, for the default per-example or per-token cross-entropy.

    Args:
        model: the model; its weights are the ones checked unless ``weights`` or ``steps`` say otherwise.
        batch: the ``(x, y)`` both copies run.
        mode: an ``--activations`` mode.
        loss_fn: the loss of ``model(x)`` and ``y`` (default: cross-entropy, per token for ``(N, T, V)``).
        seed: seeds the (stochastic-rounding) step.
        weights: trained weights to check at: a state dict, a ``model.pt``, or a finished run's folder.
        steps: first train (a copy of) the model this many exact backprop steps on ``batches``.
        batches: ``(x, y)`` training batches for ``steps`` (e.g. ``BatchLoader.epoch(0)``).
        optimizer: builds the optimizer of those steps from parameters (default Adam, lr 1e-3).
        options: options of :class:`Activations` (``group_size``, ``attention_bits``, ...).

    Raises:
        ConfigError: ``steps`` without ``batches``, or bad weights; the model's forward needs more
            than ``x`` (it takes targets), or its output does not fit the default loss (a tuple, a
            loss, logits of the wrong shape for ``y``).

    Example:
        >>> worst = min(check_gradients(model, (x, y), "blpa4"), key=lambda r: r.cosine)
        >>> trained = check_gradients(model, (x, y), "int2", steps=300, batches=loader.epoch(0))
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
    require_one_input(model, "check_gradients")
    if weights is not None or steps:
        model = copy.deepcopy(model)
        if weights is not None:
            load_weights(model, weights)
        if steps:
            if batches is None:
                raise ConfigError("check_gradients(steps=N) trains on batches=; give an iterable of (x, y) "
                                  "training batches")
            pretrain(model, batches, steps, loss_fn=loss_fn, optimizer=optimizer)
    x, y = batch
    results = []
    grads = []
    for m in ("exact", mode):
        clone = copy.deepcopy(model)
        clone.zero_grad(set_to_none=True)  # gradients the model carries would be added to
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
        cos = torch.nn.functional.cosine_similarity(a, g, dim=0, eps=1e-30).item()
        rel = ((a - g).norm() / g.norm().clamp_min(1e-30)).item()
        results.append(LayerGradient(name, cos, rel))
    return results


def track_gradients(
    model: nn.Module,
    batches: Iterable[Batch],
    mode: str,
    *,
    steps: int,
    every: int,
    probe: Batch | None = None,
    loss_fn: LossFn = cross_entropy,
    optimizer: OptimizerFactory | None = None,
    seed: int = 0,
    train_mode: str = "exact",
    **options: Any,
) -> list[GradientCheck]:
    """Per-layer agreement of ``mode`` with exact gradients at steps 0, ``every``, 2 ``every``, ... of
    backprop training of a copy of ``model`` (``model`` itself is not touched), exact or under
    ``train_mode`` (e.g. ``mode`` itself: the weights a low-bit run really reaches).

    What a benchmark plots to see whether a low-bit mode stays right while the model learns. Each check
    is :func:`check_gradients` on ``probe`` (default: the first batch, which is then not trained on).

    Example:
        >>> for c in track_gradients(model, loader.epoch(0), "int2", steps=300, every=50):
        ...     print(c.step, c.median, c.min)
    """
    for name, value in (("steps", steps), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"track_gradients {name} must be a positive integer, got {value!r}")
    it = iter(batches)
    if probe is None:
        probe = next(it)
    model = copy.deepcopy(model)
    opt = _optimizer(model, optimizer)
    checks = [GradientCheck.of(0, check_gradients(model, probe, mode, loss_fn=loss_fn, seed=seed, **options))]
    done = 0
    while done < steps:
        taken = _train(model, it, min(every, steps - done), loss_fn, opt, train_mode,
                       options if train_mode != "exact" else None)
        if taken == 0:
            break
        done += taken
        layers = check_gradients(model, probe, mode, loss_fn=loss_fn, seed=seed, **options)
        checks.append(GradientCheck.of(done, layers))
    return checks
