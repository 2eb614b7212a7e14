"""A user's own model and data, outside gradkit: what ``--model user_model:build`` imports.

``build`` follows the factory contract, ``build(input_shape, num_classes, **model_args) ->
nn.Sequential``; ``blobs`` returns a :class:`gradkit.data.Dataset`. The other functions break the
contract on purpose, for the error-message tests.
"""

from __future__ import annotations

import torch
from torch import nn

from gradkit.data import Dataset, DatasetInfo


def build(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 32) -> nn.Sequential:
    """Flatten -> Linear/ReLU -> Linear, as two blocks (so ``--stages 2`` can split it)."""
    features = 1
    for d in input_shape:
        features *= d
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, num_classes)),
    )


def not_sequential(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Linear(1, num_classes)


NOT_CALLABLE = 3


def blobs(*, classes: int = 4) -> Dataset:
    """Gaussian blobs as 1x4x4 images: learnable in an epoch."""
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(classes, 16, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        x = centers[y] + 0.08 * torch.randn(n, 16, generator=g)
        return x.clamp(0, 1).reshape(n, 1, 4, 4), y

    train_x, train_y = draw(256)
    test_x, test_y = draw(128)
    info = DatasetInfo("blobs", (1, 4, 4), classes, tuple(map(str, range(classes))), (0.5,), (0.25,),
                       False, "generated")
    return Dataset(info, train_x, train_y, test_x, test_y)
