"""ResNet depths and parameter counts match the literature and an independent closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradkit.models import build_model
from gradkit.models.resnet import BasicBlock, Bottleneck, PadShortcut

# Exact counts for (3, 32, 32) inputs and 10 classes, BN affine, Linear with bias.
# He et al. (2016, Table 6) report 0.27M / 0.85M / 1.7M for option A.
CIFAR_COUNTS = {
    # depth: (option A, option B)
    20: (269_722, 272_474),
    56: (853_018, 855_770),
    110: (1_727_962, 1_730_714),
}
# CIFAR adaptations of the bottleneck ResNets (3x3 stem, no max-pool): 42.5M and 58.2M.
BOTTLENECK_COUNTS = {101: 42_512_970, 152: 58_156_618}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closed_form(depth: int, shortcut: str, channels: int = 3, classes: int = 10) -> int:
    """Parameter count of a CIFAR ResNet written out by hand, independent of the builder."""
    n = (depth - 2) // 6
    total = 9 * channels * 16 + 2 * 16  # stem conv + BN
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c  # two 3x3 convs + two BNs
            if c_in != c and shortcut == "B":
                total += c_in * c + 2 * c  # 1x1 projection + BN
            c_in = c
    return total + 64 * classes + classes  # head


@pytest.mark.parametrize("depth", sorted(CIFAR_COUNTS))
def test_cifar_resnet_parameter_counts(depth: int) -> None:
    count_a, count_b = CIFAR_COUNTS[depth]
    a = build_model(f"resnet{depth}", (3, 32, 32), 10, shortcut="A")
    b = build_model(f"resnet{depth}", (3, 32, 32), 10)  # option B is the default
    assert n_params(a) == count_a == closed_form(depth, "A")
    assert n_params(b) == count_b == closed_form(depth, "B")
    # Option B adds exactly the two projections (16->32, 32->64) with their BNs.
    assert count_b - count_a == (16 * 32 + 64) + (32 * 64 + 128)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 164])
def test_cifar_resnet_depth(depth: int) -> None:
    n = (depth - 2) // 6
    model = build_model(f"resnet{depth}", (3, 32, 32), 10)
    blocks = [m for m in model if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * n
    assert len(model) == 3 * n + 2  # stem + blocks + head
    expected = ["stem"] + [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(1, n + 1)]
    assert list(model._modules) == expected + ["head"]
    weight_layers = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and "shortcut" not in name
    ]
    assert len(weight_layers) == depth
    widths = [b.conv2.out_channels for b in blocks]
    assert widths == [16] * n + [32] * n + [64] * n
    assert closed_form(depth, "B") == n_params(model)


def test_option_a_shortcut_is_parameter_free_and_pads() -> None:
    model = build_model("resnet20", (3, 32, 32), 10, shortcut="A")
    shortcut = model.stage2_block1.shortcut
    assert isinstance(shortcut, PadShortcut)
    assert n_params(shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    projection = build_model("resnet20", (3, 32, 32), 10).stage2_block1.shortcut
    assert isinstance(projection.conv, nn.Conv2d) and projection.conv.stride == (2, 2)


@pytest.mark.parametrize(("depth", "layers"), [(101, [3, 4, 23, 3]), (152, [3, 8, 36, 3])])
def test_bottleneck_resnets(depth: int, layers: list[int]) -> None:
    model = build_model(f"resnet{depth}", (3, 32, 32), 10)
    assert n_params(model) == BOTTLENECK_COUNTS[depth]
    stem = model.stem.conv
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.out_channels == 64
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    for s, count in enumerate(layers, start=1):
        blocks = [m for n, m in model.named_children() if n.startswith(f"stage{s}_")]
        assert len(blocks) == count and all(isinstance(b, Bottleneck) for b in blocks)
        assert blocks[-1].conv3.out_channels == 64 * 2 ** (s - 1) * 4
        assert blocks[0].conv2.stride == ((1, 1) if s == 1 else (2, 2))
    assert model.head.fc.in_features == 2048
