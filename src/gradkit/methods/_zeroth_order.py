"""Shared pieces of the forward-only peers of ULR (``es``, ``spsa``, ``forward-grad``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gradkit.methods._base import Method

__all__ = ["eval_mode_after_clean_pass", "has_eval_modules"]


def has_eval_modules(method: Method) -> bool:
    """Whether the model has BatchNorm or Dropout (whose train and eval modes differ)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout) for s in method.stages for m in s.modules())


@contextmanager
def eval_mode_after_clean_pass(method: Method, x: torch.Tensor, y: torch.Tensor) -> Iterator[float]:
    """One clean training-mode forward (updates BatchNorm statistics once; yields its loss), then every
    module in eval mode for the perturbed passes, so that they all evaluate one fixed function."""
    with torch.no_grad():
        loss = method.loss_fn(method.forward(x), y).item()
    modes = [(m, m.training) for s in method.stages for m in s.modules()]
    for s in method.stages:
        s.eval()
    try:
        yield loss
    finally:
        for m, training in modes:
            m.training = training
