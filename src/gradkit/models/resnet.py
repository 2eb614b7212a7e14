"""Residual networks for 32x32 images, as flat ``nn.Sequential`` stacks of residual blocks.

* ``resnet20/32/44/56/110/164``: the CIFAR ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016, Sec. 4.2): depth 6n+2, basic blocks, 16/32/64 channels.
  ``resnet164`` uses basic blocks (n=27), as in Huo et al., "Training Neural Networks Using
  Features Replay" (NeurIPS 2018), not the pre-activation bottleneck ResNet-164 of He et al. (2016b).
* ``resnet101/152``: bottleneck ResNets (He et al. 2016, Table 1) adapted to 32x32 inputs as in the
  Features Replay experiments: 3x3 stem with stride 1 and no max-pool.

Each residual block is one entry of the ``nn.Sequential`` ("stem", "stage1_block1", ..., "head"), so a
pipeline can be cut between any two blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models._layers import image_shape, init_kaiming, positive_ints
from gradkit.models._registry import MODELS, ModelBuilder

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PadShortcut",
    "cifar_resnet",
    "bottleneck_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet164",
    "resnet101",
    "resnet152",
]


class PadShortcut(nn.Module):
    """Parameter-free shortcut ("option A", He et al. 2016): subsample by ``stride``, zero-pad channels.

    The new channels are split evenly before and after the input's, as in the common CIFAR code.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ConfigError(f"option A shortcut cannot shrink channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad_before = (out_ch - in_ch) // 2
        self.pad_after = out_ch - in_ch - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


def _projection(in_ch: int, out_ch: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """Option B shortcut: 1x1 conv with ``stride`` (+ BN)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=not batch_norm)
    if batch_norm:
        layers["bn"] = nn.BatchNorm2d(out_ch)
    return nn.Sequential(layers)


def _norm(ch: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(ch) if batch_norm else nn.Identity()


UnitFn = Callable[[torch.Tensor, nn.Module, nn.Module, nn.Module], torch.Tensor]
"""``unit(x, norm, relu, conv)``: a residual branch's norm -> ReLU -> conv unit."""


def plain_unit(x: torch.Tensor, norm: nn.Module, relu: nn.Module, conv: nn.Module) -> torch.Tensor:
    """``conv(relu(norm(x)))``, the unit as every framework computes it."""
    return conv(relu(norm(x)))


class _ResidualBlock(nn.Module):
    """What the residual blocks share: their norm -> ReLU -> conv units go through :attr:`unit`.

    ``unit`` is the one place a block's units can be computed differently without changing its
    modules or ``state_dict``: :func:`gradkit.compress.apply_blpa` sets it on a block to keep
    low-bit codes for backward (Chakrabarti & Moseley, NeurIPS 2019); deleting the instance
    attribute restores :func:`plain_unit`.
    """

    unit: UnitFn = staticmethod(plain_unit)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the first conv (2 halves the map).
        shortcut: ``"B"`` 1x1 conv + BN projection when the shape changes; ``"A"`` parameter-free
            subsample + zero-pad. Identity when the shape is unchanged, either way.
        batch_norm: use BatchNorm after each conv (``False``: convs get biases, norms are identity).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        shortcut: str = "B",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = _norm(out_ch, batch_norm)
        # Separate ReLU modules (not in-place, not shared) so hooks see each activation once.
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=not batch_norm)
        self.bn2 = _norm(out_ch, batch_norm)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = _projection(in_ch, out_ch, stride, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit(self.conv1(x), self.bn1, self.relu1, self.conv2)
        return self.relu2(self.bn2(out) + self.shortcut(x))

    def last_norm(self) -> nn.Module:
        """The norm on the residual branch's output (zeroed by ``zero_init_residual``)."""
        return self.bn2


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by ``expansion``; projection shortcut.

    The stride sits on the 3x3 conv (as torchvision's "ResNet v1.5"), the usual choice in CIFAR code.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu3 = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = _projection(in_ch, out_ch, stride, batch_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit(self.conv1(x), self.bn1, self.relu1, self.conv2)
        out = self.unit(out, self.bn2, self.relu2, self.conv3)
        return self.relu3(self.bn3(out) + self.shortcut(x))

    def last_norm(self) -> nn.Module:
        """The norm on the residual branch's output (zeroed by ``zero_init_residual``)."""
        return self.bn3


def _stem(in_ch: int, out_ch: int, batch_norm: bool = True) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm)
    if batch_norm:
        layers["bn"] = nn.BatchNorm2d(out_ch)
    layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


def _head(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(in_features, num_classes),
        )
    )


def _finish(model: nn.Sequential, zero_init_residual: bool) -> nn.Sequential:
    init_kaiming(model)
    if zero_init_residual:
        # Goyal et al. (2017): each block starts as the identity, which helps large-batch training.
        for m in model.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                norm = m.last_norm()
                if isinstance(norm, nn.BatchNorm2d):
                    nn.init.zeros_(norm.weight)
    return model


def cifar_resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int,
    width: int = 16,
    shortcut: str = "B",
    zero_init_residual: bool = False,
) -> nn.Sequential:
    """CIFAR ResNet of depth ``6n+2`` (He et al. 2016, Sec. 4.2): 3 stages of ``n`` basic blocks.

    Blocks: ``stem`` (3x3 conv + BN + ReLU), ``stage{s}_block{b}`` for s = 1..3 (channels ``width``,
    ``2*width``, ``4*width``; stage 2 and 3 start with stride 2), ``head`` (global average pool +
    flatten + Linear).

    Args:
        input_shape: ``(C, H, W)``; any size works thanks to the global pool.
        num_classes: number of output logits.
        depth: 20, 32, 44, 56, 110, 164, ... (any ``6n+2``).
        width: channels of the first stage (16 in the paper).
        shortcut: ``"B"`` (default) 1x1 conv + BN where the shape changes, or ``"A"`` zero-padding
            identity as in the paper's CIFAR experiments (no extra parameters).
        zero_init_residual: start each block's last BN at zero (Goyal et al. 2017).

    Raises:
        ConfigError: ``depth`` is not ``6n+2``, ``shortcut`` not A/B, or a bad shape.
    """
    c, _, _ = image_shape(f"resnet{depth}", input_shape)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}"
        )
    if shortcut not in ("A", "B"):
        raise ConfigError(
            f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 conv + BN), got {shortcut!r}"
        )
    (width,) = positive_ints(f"resnet{depth}", "width", width)
    n = (depth - 2) // 6
    blocks: OrderedDict[str, nn.Module] = OrderedDict(stem=_stem(c, width))
    in_ch = width
    for s, (out_ch, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
        for b in range(1, n + 1):
            blocks[f"stage{s}_block{b}"] = BasicBlock(
                in_ch, out_ch, stride if b == 1 else 1, shortcut=shortcut
            )
            in_ch = out_ch
    blocks["head"] = _head(in_ch, num_classes)
    return _finish(nn.Sequential(blocks), zero_init_residual)


def bottleneck_resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    layers: Sequence[int],
    width: int = 64,
    zero_init_residual: bool = False,
) -> nn.Sequential:
    """Bottleneck ResNet (He et al. 2016) adapted to 32x32 inputs, as used by Huo et al. (2018).

    The ImageNet 7x7/2 stem and max-pool are replaced by a 3x3 stride-1 conv (64 channels), so a
    32x32 image keeps its resolution in stage 1. Four stages of ``layers[i]`` bottleneck blocks with
    ``width * 2**i`` planes (output ``4x`` that), strides 1, 2, 2, 2, then global average pool + Linear.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        layers: blocks per stage, ``[3, 4, 23, 3]`` for ResNet-101, ``[3, 8, 36, 3]`` for ResNet-152.
        width: planes of the first stage (64 in the paper).
        zero_init_residual: start each block's last BN at zero (Goyal et al. 2017).
    """
    counts = positive_ints("bottleneck resnet", "layers", layers)
    depth = 3 * sum(counts) + 2
    c, _, _ = image_shape(f"resnet{depth}", input_shape)
    (width,) = positive_ints(f"resnet{depth}", "width", width)
    blocks: OrderedDict[str, nn.Module] = OrderedDict(stem=_stem(c, width))
    in_ch = width
    for s, count in enumerate(counts, start=1):
        planes = width * 2 ** (s - 1)
        for b in range(1, count + 1):
            stride = 2 if (b == 1 and s > 1) else 1
            blocks[f"stage{s}_block{b}"] = Bottleneck(in_ch, planes, stride)
            in_ch = planes * Bottleneck.expansion
    blocks["head"] = _head(in_ch, num_classes)
    return _finish(nn.Sequential(blocks), zero_init_residual)


def _cifar_builder(depth: int) -> ModelBuilder:
    n = (depth - 2) // 6

    def builder(
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        width: int = 16,
        shortcut: str = "B",
        zero_init_residual: bool = False,
    ) -> nn.Sequential:
        return cifar_resnet(
            input_shape,
            num_classes,
            depth=depth,
            width=width,
            shortcut=shortcut,
            zero_init_residual=zero_init_residual,
        )

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = (
        f"CIFAR ResNet-{depth} (He et al. 2016): 3 stages x {n} basic blocks; see cifar_resnet."
    )
    help_ = f"CIFAR ResNet, {depth} layers (3x{n} basic blocks, 16/32/64 channels)"
    if depth == 164:
        help_ += ", basic blocks as in Features Replay"
    return MODELS.register(f"resnet{depth}", help=help_)(builder)


def _bottleneck_builder(depth: int, layers: tuple[int, ...]) -> ModelBuilder:
    def builder(
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> nn.Sequential:
        return bottleneck_resnet(
            input_shape,
            num_classes,
            layers=layers,
            width=width,
            zero_init_residual=zero_init_residual,
        )

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = (
        f"Bottleneck ResNet-{depth} {list(layers)} for 32x32 inputs (Huo et al. 2018); "
        "see bottleneck_resnet."
    )
    help_ = f"bottleneck ResNet-{depth} {list(layers)} for 32x32 (3x3 stem, no max-pool)"
    return MODELS.register(f"resnet{depth}", help=help_)(builder)


resnet20 = _cifar_builder(20)
resnet32 = _cifar_builder(32)
resnet44 = _cifar_builder(44)
resnet56 = _cifar_builder(56)
resnet110 = _cifar_builder(110)
resnet164 = _cifar_builder(164)
resnet101 = _bottleneck_builder(101, (3, 4, 23, 3))
resnet152 = _bottleneck_builder(152, (3, 8, 36, 3))
