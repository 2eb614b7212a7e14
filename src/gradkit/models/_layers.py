"""Small pieces shared by the model builders: shape checks, conv blocks, initialisation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from torch import nn

from gradkit.errors import ConfigError

__all__ = [
    "image_shape",
    "positive_ints",
    "conv_bn_relu",
    "init_kaiming",
    "pooled_size",
    "has_eval_modules",
]


def has_eval_modules(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` (or their children) is a BatchNorm or Dropout, whose training and
    evaluation modes compute different things."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout)
               for module in modules for m in module.modules())


def image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_shape``; convolutional models need exactly three dimensions.

    Raises:
        ConfigError: the shape is not ``(C, H, W)``.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise ConfigError(
            f"model {model!r} expects input_shape (C, H, W) such as (3, 32, 32), got {shape}; "
            "use model 'mlp' for flat inputs"
        )
    return shape  # type: ignore[return-value]


def positive_ints(model: str, option: str, values: int | Sequence[int]) -> tuple[int, ...]:
    """``values`` as a tuple of positive ints (a single int is a 1-tuple).

    Raises:
        ConfigError: a value is not a positive int.
    """
    seq = (values,) if isinstance(values, int) else tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in seq):
        raise ConfigError(f"{option} for model {model!r} must be positive ints, got {values!r}")
    return seq


def pooled_size(model: str, hw: tuple[int, int], halvings: int) -> tuple[int, int]:
    """Spatial size after ``halvings`` 2x2 max-pools (floor, as ``nn.MaxPool2d(2)`` does).

    Raises:
        ConfigError: the input is too small, so a pool would produce an empty map.
    """
    h, w = hw
    for _ in range(halvings):
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        need = 2**halvings
        raise ConfigError(
            f"input {hw[0]}x{hw[1]} is too small for model {model!r}: it pools {halvings} "
            f"times, so height and width must be >= {need}"
        )
    return h, w


def conv_bn_relu(
    in_ch: int,
    out_ch: int,
    *,
    stride: int = 1,
    batch_norm: bool = True,
    pool: bool = False,
) -> nn.Sequential:
    """3x3 conv (+ BN) + ReLU (+ 2x2 max-pool) as one block with readable child names.

    The conv has no bias when BN follows, since BN's shift makes it redundant.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not batch_norm)
    if batch_norm:
        layers["bn"] = nn.BatchNorm2d(out_ch)
    # Not in-place: gradkit methods may hook a layer's output (noise injection, compression), and an
    # in-place ReLU would silently rewrite the tensor a hook saw.
    layers["relu"] = nn.ReLU()
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def init_kaiming(model: nn.Module) -> None:
    """He et al. (2015) normal init for convs (fan-out, as torchvision's ResNets); BN to (1, 0).

    Linear layers keep PyTorch's default init, which trains these heads well.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
