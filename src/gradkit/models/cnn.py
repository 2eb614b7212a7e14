"""A small, fast convolutional net for MNIST-sized images."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from gradkit.models._layers import (
    conv_bn_relu,
    image_shape,
    init_kaiming,
    pooled_size,
    positive_ints,
)
from gradkit.models._registry import MODELS

__all__ = ["cnn"]


@MODELS.register("cnn", help="2 conv blocks (32, 64) + Linear 128 + head; fast on CPU, for 28x28")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    batch_norm: bool = True,
) -> nn.Sequential:
    """Small CNN: ``conv1..convN`` (3x3 conv + BN + ReLU + 2x2 max-pool), ``fc`` (flatten + Linear +
    ReLU), ``head`` (Linear).

    Sized for Fashion-MNIST on a CPU; the flatten size is computed from ``input_shape``, so any image
    with height and width >= ``2 ** len(channels)`` works.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        channels: output channels of the conv blocks, one block each.
        hidden: width of the fully connected layer before the head.
        batch_norm: put BatchNorm after each conv.
    """
    c, h, w = image_shape("cnn", input_shape)
    chans = positive_ints("cnn", "channels", channels)
    (hidden,) = positive_ints("cnn", "hidden", hidden)
    ph, pw = pooled_size("cnn", (h, w), len(chans))
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for i, out_ch in enumerate(chans, start=1):
        blocks[f"conv{i}"] = conv_bn_relu(c, out_ch, batch_norm=batch_norm, pool=True)
        c = out_ch
    blocks["fc"] = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(c * ph * pw, hidden), relu=nn.ReLU())
    )
    blocks["head"] = nn.Sequential(OrderedDict(fc=nn.Linear(hidden, num_classes)))
    model = nn.Sequential(blocks)
    init_kaiming(model)
    return model
