"""The default loss: cross-entropy for class logits ``(N, C)`` and for per-token logits ``(N, T, V)``.

``torch.nn.functional.cross_entropy`` wants the classes in dimension 1, so a language model's
``(N, T, V)`` output would be read as ``T`` classes. :func:`cross_entropy` flattens the tokens first:
the loss is the mean over every token of the batch, and ``reduction="none"`` gives one value per
sequence (the mean over its tokens), which is what per-sample estimators (likelihood ratio) need.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["cross_entropy"]


def cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``(N, C)`` against labels ``(N,)``, or ``(N, T, V)`` against ``(N, T)``.

    Args:
        output: logits, ``(N, C)`` (or any shape ``F.cross_entropy`` takes), or ``(N, T, V)``.
        target: class indices ``(N,)``, or the next token at every position ``(N, T)``.
        reduction: ``mean`` (over examples, or over every token), ``sum``, or ``none`` (one loss per
            example; per sequence, the mean over its tokens).

    Returns:
        The loss; the same as ``F.cross_entropy`` for 2-D logits.

    Example:
        >>> logits, tokens = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
        >>> round(cross_entropy(logits, tokens).item(), 4)  # ln 7
        1.9459
    """
    if output.dim() != 3 or target.dim() != 2:
        return F.cross_entropy(output, target, reduction=reduction)
    n, t, v = output.shape
    per_token = F.cross_entropy(output.reshape(n * t, v), target.reshape(n * t), reduction="none")
    if reduction == "mean":
        return per_token.mean()
    if reduction == "sum":
        return per_token.sum()
    if reduction == "none":
        return per_token.view(n, t).mean(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")
