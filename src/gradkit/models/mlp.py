"""A plain multi-layer perceptron for any input shape."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from gradkit.models._layers import positive_ints
from gradkit.models._registry import MODELS

__all__ = ["mlp"]


@MODELS.register("mlp", help="flatten + Linear/ReLU hidden layers (default 256, 256) + linear head")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[int] = (256, 256),
) -> nn.Sequential:
    """Multi-layer perceptron: blocks ``hidden1..hiddenN`` (Linear + ReLU) and ``head`` (Linear).

    Hidden layers use He et al. (2015) normal init; the head keeps PyTorch's default.

    The input is flattened inside the first block, so any ``input_shape`` works. Each hidden layer is
    its own block, so the network can be split between any two layers.

    Args:
        input_shape: shape of one example, e.g. ``(1, 8, 8)``.
        num_classes: number of output logits.
        hidden: widths of the hidden layers; ``()`` gives a linear classifier.

    Example:
        >>> mlp((1, 8, 8), 10, hidden=(32,))[0]
        Sequential(
          (flatten): Flatten(start_dim=1, end_dim=-1)
          (fc): Linear(in_features=64, out_features=32, bias=True)
          (relu): ReLU()
        )
    """
    widths = positive_ints("mlp", "hidden", hidden) if len(tuple(hidden)) else ()
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    in_features = math.prod(input_shape)
    for i, width in enumerate(widths, start=1):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if i == 1:
            layers["flatten"] = nn.Flatten()
        fc = nn.Linear(in_features, width)
        # He et al. (2015) init for ReLU layers: PyTorch's default (uniform, gain 1/sqrt(3)) shrinks
        # the signal layer by layer and trains visibly slower in a short run (digits, 5 epochs).
        nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
        nn.init.zeros_(fc.bias)
        layers["fc"] = fc
        layers["relu"] = nn.ReLU()
        blocks[f"hidden{i}"] = nn.Sequential(layers)
        in_features = width
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if not widths:
        head["flatten"] = nn.Flatten()
    head["fc"] = nn.Linear(in_features, num_classes)
    blocks["head"] = nn.Sequential(head)
    return nn.Sequential(blocks)
