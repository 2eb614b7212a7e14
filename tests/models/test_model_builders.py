"""Every registered model builds, runs forward and backward, and rejects bad options clearly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models import MODELS, build_model

EXPECTED_NAMES = {
    "mlp",
    "cnn",
    "snn",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet164",
    "resnet101",
    "resnet152",
    "resnet5",
    "vgg8",
}
# Text and graph models: tested in tests/likelihood_ratio/test_models_data.py.
NON_IMAGE = {"rnn", "gru", "lstm", "gcn", "gpt"}
BIG = {"resnet101", "resnet152"}  # tens of millions of parameters: forward on batch 2 only
SHAPES = [(1, 28, 28), (3, 32, 32)]


def test_registered_names() -> None:
    assert set(MODELS.names()) == EXPECTED_NAMES | NON_IMAGE
    for name in MODELS:
        assert MODELS.help(name), f"{name} has no help text"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_shape(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert isinstance(model, nn.Sequential)
    names = list(model._modules)
    assert names[-1] == "head"
    assert all("." not in n and n for n in names)
    batch = 2 if name in BIG else 3
    with torch.no_grad():
        out = model(torch.randn(batch, *shape))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES - BIG))
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    # 16x16 (the smallest vgg8 takes) keeps resnet164's backward quick; 32x32 is run above.
    model = build_model(name, (3, 16, 16), 7)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 7, (2,))
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_tiny_images(name: str) -> None:
    # sklearn digits are 1x8x8; these models must take them.
    model = build_model(name, (1, 8, 8), 10)
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert out.shape == (5, 10)
    out.sum().backward()


def test_mlp_takes_any_shape_and_hidden_sizes() -> None:
    model = build_model("mlp", (7,), 3, hidden=(16, 8, 4))
    assert list(model._modules) == ["hidden1", "hidden2", "hidden3", "head"]
    assert model(torch.randn(2, 7)).shape == (2, 3)
    linear = build_model("mlp", (2, 3, 4), 5, hidden=())
    assert list(linear._modules) == ["head"]
    assert linear(torch.randn(2, 2, 3, 4)).shape == (2, 5)


def test_default_layouts() -> None:
    mlp = build_model("mlp", (1, 8, 8), 10)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [256, 256, 10]
    cnn = build_model("cnn", (1, 28, 28), 10)
    assert list(cnn._modules) == ["conv1", "conv2", "fc", "head"]
    assert [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [32, 64]
    assert cnn.fc.fc.in_features == 64 * 7 * 7  # 28 -> 14 -> 7
    vgg = build_model("vgg8", (3, 32, 32), 10)
    assert [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)] == [
        64,
        128,
        256,
        256,
        512,
    ]
    assert vgg.fc1.fc.in_features == 512 * 2 * 2  # four 2x2 pools: 32 -> 2
    assert build_model("vgg8", (1, 28, 28), 10).fc1.fc.in_features == 512  # 28 -> 1


@pytest.mark.parametrize(
    ("name", "convs", "linears"), [("resnet5", 4, 1), ("vgg8", 5, 3), ("resnet20", 19, 1)]
)
def test_weight_layer_counts(name: str, convs: int, linears: int) -> None:
    """The paper names count weight layers (shortcut projections excluded)."""
    model = build_model(name, (3, 32, 32), 10)
    main_convs = [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n
    ]
    assert len(main_convs) == convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == linears


@pytest.mark.parametrize("name", ["cnn", "resnet5", "vgg8"])
def test_batch_norm_off(name: str) -> None:
    model = build_model(name, (3, 32, 32), 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with_bn = build_model(name, (3, 32, 32), 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))


def test_same_seed_same_weights() -> None:
    torch.manual_seed(3)
    a = build_model("resnet20", (3, 32, 32), 10)
    torch.manual_seed(3)
    b = build_model("resnet20", (3, 32, 32), 10)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_kaiming_init_of_convs() -> None:
    torch.manual_seed(0)
    model = build_model("resnet56", (3, 32, 32), 10)
    weight = model.stage3_block5.conv2.weight  # 64 -> 64, 3x3: fan_out = 576
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)


def test_zero_init_residual() -> None:
    model = build_model("resnet20", (3, 32, 32), 10, zero_init_residual=True)
    assert torch.count_nonzero(model.stage2_block1.bn2.weight) == 0
    assert torch.count_nonzero(model.stage2_block1.bn1.weight) > 0
    big = build_model("resnet101", (3, 32, 32), 10, zero_init_residual=True)
    assert torch.count_nonzero(big.stage1_block1.bn3.weight) == 0


@pytest.mark.parametrize(
    ("call", "hint"),
    [
        (
            lambda: build_model("cnn", (1, 28, 28), 10, depth=3),
            "unknown option(s) for model 'cnn': depth",
        ),
        (lambda: build_model("resnet20", (3, 32, 32), 10, widht=8), "accepts: width, shortcut"),
        (lambda: build_model("nope", (3, 32, 32), 10), "choose one of: cnn, gcn, gpt, mlp"),
        (lambda: build_model("cnn", (784,), 10), "expects input_shape (C, H, W)"),
        (lambda: build_model("vgg8", (1, 8, 8), 10), "must be >= 16"),
        (lambda: build_model("cnn", (1, 2, 2), 10), "must be >= 4"),
        (lambda: build_model("resnet20", (3, 32, 32), 10, shortcut="C"), "'A' (zero-pad"),
        (lambda: build_model("mlp", (1, 8, 8), 0), "num_classes must be a positive int"),
        (lambda: build_model("mlp", (1, 0, 8), 10), "positive sizes"),
        (lambda: build_model("mlp", (1, 8, 8), 10, hidden=(64, 0)), "positive ints"),
        (lambda: build_model("resnet20", (3, 32, 32), 10, width=-1), "positive ints"),
    ],
)
def test_bad_options_raise_config_error(call, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert hint in str(info.value)
    assert isinstance(info.value, ValueError)


def test_mlp_learns_digits() -> None:
    """The brief's bar: >= 0.95 test accuracy on sklearn digits in 5 epochs of SGD (about 1 s)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x_all, y_all = datasets.load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y_all), generator=gen)
    x = torch.tensor(x_all, dtype=torch.float32)[order].reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(y_all)[order]
    x = (x - x[:1437].mean()) / x[:1437].std()
    x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    # The library's defaults: batch 128, SGD + Nesterov 0.9, lr 0.05, weight decay 5e-4, cosine.
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps_per_epoch = math.ceil(len(x_train) / 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5 * steps_per_epoch)
    for _ in range(5):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.95
