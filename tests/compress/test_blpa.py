"""The faithful BatchNorm -> ReLU -> Conv path (Chakrabarti & Moseley 2019)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress import apply_blpa, bn_relu_conv, remove_blpa
from gradkit.models import build_model

# Every test runs on the fused C kernels and on the torch path (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")

# γ negative, zero and tiny, thresholds -β/γ inside and far outside the ±3 window.
GAMMA = [1.0, -0.5, 0.0, 2.0, 0.3, -1.2, 0.8, 1e-3]
BETA = [0.1, 0.2, 0.5, -4.0, 0.0, 5.0, -0.3, 0.01]


def _unit(conv: nn.Conv2d | None = None) -> tuple[nn.BatchNorm2d, nn.Conv2d]:
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(GAMMA))
        bn.bias.copy_(torch.tensor(BETA))
    return bn, conv if conv is not None else nn.Conv2d(8, 6, 3, padding=1, stride=2)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("training", [True, False])
def test_forward_exact_and_running_stats_match_batchnorm(bits: int, training: bool) -> None:
    torch.manual_seed(0)
    bn, conv = _unit()
    bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
    bn.train(training)
    bn2.train(training)
    x = torch.randn(16, 8, 10, 10) * 2 + 1
    for _ in range(2):  # twice, so the running statistics are used and updated
        out = bn_relu_conv(x.requires_grad_(), bn, conv, bits)
        torch.testing.assert_close(out, conv2(F.relu(bn2(x))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)
    assert int(bn.num_batches_tracked) == int(bn2.num_batches_tracked)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_relu_mask_bit_exact(bits: int) -> None:
    """With an identity 1x1 conv and an all-ones output gradient, dβ_c counts the units the mask lets
    through: it must equal the exact count of positive ReLU inputs, to the unit."""
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
    bn, conv = _unit(conv)
    x = torch.randn(32, 8, 12, 12) * 3 - 1
    out = bn_relu_conv(x.requires_grad_(), bn, conv, bits)
    out.backward(torch.ones_like(out))
    assert bn.bias.grad is not None
    positive = (out > 0).sum(dim=(0, 2, 3)).float()
    assert torch.equal(bn.bias.grad, positive)


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.98)])
def test_gradients_close_to_exact_and_exact_where_the_paper_says(bits: int, min_cos: float) -> None:
    torch.manual_seed(2)
    bn, conv = _unit()
    bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
    x = torch.randn(32, 8, 10, 10) * 2 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(32, 6, 5, 5)
    bn_relu_conv(x1, bn, conv, bits).backward(g)
    conv2(F.relu(bn2(x2))).backward(g)
    # β and the conv bias are exact (only the mask and the upstream gradient enter them).
    torch.testing.assert_close(bn.bias.grad, bn2.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(conv.bias.grad, conv2.bias.grad)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    assert cos(conv.weight.grad, conv2.weight.grad) > min_cos
    assert cos(bn.weight.grad, bn2.weight.grad) > min_cos
    assert cos(x1.grad, x2.grad) > min_cos


def test_eval_mode_with_gradients_uses_running_statistics() -> None:
    torch.manual_seed(3)
    bn, conv = _unit()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
    bn.eval()
    bn2.eval()
    x = torch.randn(8, 8, 6, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    bn_relu_conv(x1, bn, conv, 8).sum().backward()
    conv2(F.relu(bn2(x2))).sum().backward()
    assert F.cosine_similarity(x1.grad.flatten(), x2.grad.flatten(), dim=0) > 0.999
    assert torch.equal(bn.running_mean, bn2.running_mean)


def test_apply_blpa_keeps_state_and_outputs_and_undoes() -> None:
    torch.manual_seed(4)
    model = build_model("resnet20", (3, 16, 16), 10)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert apply_blpa(model, 4) == 9
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)  # training mode, exact forward
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
    remove_blpa(model)
    assert all("forward" not in vars(m) for m in model.modules())
