"""The small networks of the likelihood-ratio paper: ResNet-5 and VGG-8.

Jiang, Zhang, Xu, Yu, Peng, "One Forward is Enough for Neural Network Training via Likelihood Ratio
Method" (ICLR 2024) trains these with noise-injection gradients. The paper names them by their number
of weight layers but does not pin down the exact layouts; the choices made here are stated in each
docstring. Every weight layer (conv or Linear) is in its own block, except the two convs of ResNet-5's
residual block, so a pipeline can be cut at layer boundaries.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from gradkit.models._layers import (
    conv_bn_relu,
    image_shape,
    init_kaiming,
    pooled_size,
    positive_ints,
)
from gradkit.models._registry import MODELS
from gradkit.models.resnet import BasicBlock

__all__ = ["resnet5", "vgg8"]


@MODELS.register("resnet5", help="ResNet-5 of the likelihood-ratio paper: 4 convs + Linear")
def resnet5(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 64,
    batch_norm: bool = True,
) -> nn.Sequential:
    """ResNet-5 (Jiang et al., ICLR 2024): five weight layers, four convs and one Linear.

    Our layout (the paper gives none): ``stem`` 3x3 conv ``width`` + BN + ReLU + 2x2 max-pool;
    ``stage1_block1`` one basic residual block of ``width`` channels (two convs, identity
    shortcut); ``stage2_conv`` 3x3 conv ``width -> 2*width`` with stride 2 + BN + ReLU; ``head``
    global average pool + Linear. This matches the five per-layer copy counts of the ULR reference
    (``[800, 800, 800, 800, 100]``: four convs, then the Linear).

    Args:
        input_shape: ``(C, H, W)``, H and W >= 2.
        num_classes: number of output logits.
        width: channels of the stem and the residual block (64 by default).
        batch_norm: BatchNorm after each conv; ``False`` gives the BN-free variant (convs with bias).
    """
    c, h, w = image_shape("resnet5", input_shape)
    (width,) = positive_ints("resnet5", "width", width)
    pooled_size("resnet5", (h, w), 1)
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = conv_bn_relu(c, width, batch_norm=batch_norm, pool=True)
    blocks["stage1_block1"] = BasicBlock(width, width, batch_norm=batch_norm)
    blocks["stage2_conv"] = conv_bn_relu(width, 2 * width, stride=2, batch_norm=batch_norm)
    blocks["head"] = nn.Sequential(
        OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(2 * width, num_classes),
        )
    )
    model = nn.Sequential(blocks)
    init_kaiming(model)
    return model


# Conv widths with "M" marking a 2x2 max-pool after the preceding conv.
_VGG8_CONVS = (64, "M", 128, "M", 256, 256, "M", 512, "M")


@MODELS.register("vgg8", help="VGG-8 of the likelihood-ratio paper: 5 convs + 3 Linear")
def vgg8(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: int = 512,
    batch_norm: bool = True,
) -> nn.Sequential:
    """VGG-8 (Jiang et al., ICLR 2024): eight weight layers, five convs and three Linear.

    Our layout (the paper gives none; this is VGG-11's CIFAR configuration cut to five convs):
    ``conv1..conv5`` with 64, 128, 256, 256, 512 channels, each 3x3 conv + BN + ReLU, with a 2x2
    max-pool after convs 1, 2, 4 and 5; then ``fc1`` flatten + Linear ``hidden`` + ReLU, ``fc2``
    Linear ``hidden`` + ReLU, ``head`` Linear. Four pools leave a 2x2 map for 32x32 inputs, so the
    first Linear takes 512*2*2 = 2048 features (512 for 28x28 inputs); the size is computed from
    ``input_shape``.

    Args:
        input_shape: ``(C, H, W)``, H and W >= 16.
        num_classes: number of output logits.
        hidden: width of the two hidden Linear layers.
        batch_norm: BatchNorm after each conv; ``False`` gives the plain VGG (convs with bias).
    """
    c, h, w = image_shape("vgg8", input_shape)
    (hidden,) = positive_ints("vgg8", "hidden", hidden)
    pools = _VGG8_CONVS.count("M")
    ph, pw = pooled_size("vgg8", (h, w), pools)
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    widths = [v for v in _VGG8_CONVS if v != "M"]
    pooled_after = [
        i + 1 < len(_VGG8_CONVS) and _VGG8_CONVS[i + 1] == "M"
        for i, v in enumerate(_VGG8_CONVS)
        if v != "M"
    ]
    for i, (out_ch, pool) in enumerate(zip(widths, pooled_after, strict=True), start=1):
        blocks[f"conv{i}"] = conv_bn_relu(c, int(out_ch), batch_norm=batch_norm, pool=pool)
        c = int(out_ch)
    blocks["fc1"] = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(c * ph * pw, hidden), relu=nn.ReLU())
    )
    blocks["fc2"] = nn.Sequential(OrderedDict(fc=nn.Linear(hidden, hidden), relu=nn.ReLU()))
    blocks["head"] = nn.Sequential(OrderedDict(fc=nn.Linear(hidden, num_classes)))
    model = nn.Sequential(blocks)
    init_kaiming(model)
    return model
