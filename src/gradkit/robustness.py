"""Robustness of a trained model to input perturbations: FGSM, PGD (L∞) and Gaussian noise.

Jiang et al. (ICLR 2024) report that likelihood-ratio-trained models are more robust than backprop-
trained ones; ``gradkit evaluate`` measures it. ``eps`` is in image units ([0, 1] pixel scale) and is
converted per channel to the normalised inputs the model sees; adversarial images are kept in [0, 1].

* FGSM (Goodfellow et al., 2015): ``x + eps · sign(∇ₓL)``;
* PGD (Madry et al., 2018): ``steps`` signed-gradient steps of ``2.5·eps/steps`` from a random start,
  projected on the eps-ball;
* gaussian: ``x + eps · N(0, I)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.data import BatchLoader
from gradkit.errors import ConfigError

__all__ = ["ATTACKS", "attacked_accuracy"]

ATTACKS = ("fgsm", "pgd", "gaussian")


def attacked_accuracy(
    model: nn.Module, loader: BatchLoader, attack: str, eps: float, *, steps: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Clean and attacked accuracy of ``model`` (eval mode) on ``loader``'s batches.

    Raises:
        ConfigError: unknown attack, negative eps, or data that are not images.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    if not eps >= 0:
        raise ConfigError(f"--eps must be >= 0 (in [0, 1] pixel units), got {eps}")
    info = loader.info
    if len(info.input_shape) != 3:
        raise ConfigError(f"attacks perturb images; {info.name} examples have shape {info.input_shape}")
    shape = (1, -1, 1, 1)
    mean = torch.tensor(info.mean).view(shape)
    std = torch.tensor(info.std).view(shape)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    eps_n = eps / std
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    correct = attacked = total = 0
    for x, y in loader.epoch(0):
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
        x_adv = _ATTACK[attack](model, x, y, eps_n, lo, hi, steps, generator)
        with torch.no_grad():
            attacked += int((model(x_adv).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1), attacked / max(total, 1)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
    return g


def _clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(x, hi), lo)


def _fgsm(model, x, y, eps, lo, hi, steps, generator):  # noqa: ANN001, ANN202
    return _clip(x + eps * _input_grad(model, x, y).sign(), lo, hi)


def _pgd(model, x, y, eps, lo, hi, steps, generator):  # noqa: ANN001, ANN202
    alpha = 2.5 * eps / steps
    start = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    x_adv = _clip(x + start, lo, hi)
    for _ in range(steps):
        x_adv = x_adv + alpha * _input_grad(model, x_adv, y).sign()
        x_adv = _clip(torch.maximum(torch.minimum(x_adv, x + eps), x - eps), lo, hi)
    return x_adv


def _gaussian(model, x, y, eps, lo, hi, steps, generator):  # noqa: ANN001, ANN202
    return _clip(x + eps * torch.randn(x.shape, generator=generator), lo, hi)


_ATTACK: dict[str, Callable[..., torch.Tensor]] = {"fgsm": _fgsm, "pgd": _pgd, "gaussian": _gaussian}
