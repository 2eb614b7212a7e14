"""The default loss: cross-entropy for class logits ``(N, C)`` and for per-token logits ``(N, T, V)``.

``torch.nn.functional.cross_entropy`` wants the classes in dimension 1, so a language model's
``(N, T, V)`` output would be read as ``T`` classes. :func:`cross_entropy` flattens the tokens first:
the loss is the mean over every token of the batch, and ``reduction="none"`` gives one value per
sequence (the mean over its tokens), which is what per-sample estimators (likelihood ratio) need.

Shapes are checked before torch sees them (a few integer comparisons per step), so that a model whose
output does not fit the data's targets is one line naming both shapes and the fix, not torch's
``Expected target size [32, 81], got [32, 64]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from gradkit.errors import ConfigError

__all__ = ["cross_entropy", "check_logits"]

_OWN_LOSS = ("make the model's forward(x) return only the logits and leave the loss to gradkit "
             "(see README 'Your own model')")


def check_logits(output: Any, target: torch.Tensor) -> None:
    """Raise a one-line :class:`ConfigError` if ``output`` cannot be scored against ``target``.

    Accepted: class logits ``(N, C)`` with labels ``(N,)``, per-token logits ``(N, T, V)`` with next
    tokens ``(N, T)``, and whatever else ``F.cross_entropy`` takes (e.g. probability targets).
    """
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"the model returned a {type(output).__name__}, not a tensor of logits (a model that "
                          f"takes targets or returns its loss?): {_OWN_LOSS}")
    if output.dim() == 0:
        raise ConfigError(f"the model returned a scalar, not logits (N, C) or (N, T, V) (its loss?): {_OWN_LOSS}")
    if target.is_floating_point():
        return  # class probabilities: F.cross_entropy checks that they match the logits
    got, want = tuple(target.shape), tuple(output.shape)
    if output.dim() == 3 and got != want[:2]:
        fix = ("the data has one label per example: use a model that returns class logits (N, C), or "
               "next-token data such as --data text" if target.dim() == 1 else
               "make the model's sequence length and the data's agree (e.g. --data-option context=T)")
        raise ConfigError(f"the model returned per-token logits {want} (N, T, V), which need targets (N, T) = "
                          f"{want[:2]}, but the targets are {got}: {fix}")
    if output.dim() == 2 and target.dim() != 1:
        raise ConfigError(f"the model returned class logits {want} (N, C), which need one label per example "
                          f"({want[0]},), but the targets are {got} (next tokens?): use a model that returns "
                          "per-token logits (N, T, V), such as --model gpt")


def cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``(N, C)`` against labels ``(N,)``, or ``(N, T, V)`` against ``(N, T)``.

    Args:
        output: logits, ``(N, C)`` (or any shape ``F.cross_entropy`` takes), or ``(N, T, V)``.
        target: class indices ``(N,)``, or the next token at every position ``(N, T)``.
        reduction: ``mean`` (over examples, or over every token), ``sum``, or ``none`` (one loss per
            example; per sequence, the mean over its tokens).

    Returns:
        The loss; the same as ``F.cross_entropy`` for 2-D logits.

    Raises:
        ConfigError: the output is not a logits tensor, or its shape does not fit the targets'
            (see :func:`check_logits`); a target outside the model's classes.

    Example:
        >>> logits, tokens = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
        >>> round(cross_entropy(logits, tokens).item(), 4)  # ln 7
        1.9459
    """
    check_logits(output, target)
    try:
        if output.dim() != 3 or target.dim() != 2:
            return F.cross_entropy(output, target, reduction=reduction)
        n, t, v = output.shape
        per_token = F.cross_entropy(output.reshape(n * t, v), target.reshape(n * t), reduction="none")
    except IndexError as e:  # CPU: "Target 81 is out of bounds."
        raise ConfigError(f"{e} The model has {output.shape[-1 if output.dim() == 3 else 1]} outputs per "
                          "prediction: build it with num_classes = the data's number of classes") from None
    if reduction == "mean":
        return per_token.mean()
    if reduction == "sum":
        return per_token.sum()
    if reduction == "none":
        return per_token.view(n, t).mean(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")
