"""Running a forward pass a second time without touching BatchNorm's running statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["frozen_running_stats", "BN_POLICIES"]

BN_POLICIES = ("play", "reference")
"""How Features Replay treats BatchNorm running statistics:

* ``play`` (default): the play forward updates them once per batch; the replay forward normalises
  with batch statistics but leaves the running ones alone.
* ``reference``: both forwards update them, as the reference code does (two updates per iteration).
"""


@contextmanager
def frozen_running_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, BatchNorm layers of ``module`` still use batch statistics in training mode,
    but their running mean, variance and batch counter are left as they were.

    The layers update throw-away copies, and the originals are put back afterwards. Copying values
    back instead would be an in-place change to tensors the new graph saved for its backward pass.
    """
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    if enabled:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = getattr(m, name)
                    if buf is not None:
                        swapped.append((m, name, buf))
                        setattr(m, name, buf.detach().clone())
    try:
        yield
    finally:
        for m, name, buf in swapped:
            setattr(m, name, buf)
