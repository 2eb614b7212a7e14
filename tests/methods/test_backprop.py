"""Backprop (`bp`) is the reference: it must equal a plain PyTorch training loop exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradkit
from gradkit.errors import ConfigError
from gradkit.methods import METHODS, Backprop, build
from gradkit.optim import OptimizerConfig


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 4)),
    )


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("opt", [OptimizerConfig(name="sgd", lr=0.1), OptimizerConfig(name="adam", lr=0.01)])
def test_bp_equals_plain_pytorch_loop(opt: OptimizerConfig) -> None:
    model = small_model()
    reference = copy.deepcopy(model)
    ref_opt = opt.factory()(reference.parameters())
    method = build("bp", [model], optimizer=opt.factory())
    for x, y in batches():
        ref_loss = nn.functional.cross_entropy(reference(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert method.step(x, y) == ref_loss.item()
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_bp_result_does_not_depend_on_the_split() -> None:
    one, three = small_model(), small_model()
    m1 = build("bp", gradkit.split(one, 1, balance="count"))
    m3 = build("bp", gradkit.split(three, 3, balance="count"))
    for x, y in batches():
        assert m1.step(x, y) == m3.step(x, y)
    for p, q in zip(one.parameters(), three.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bp_state_dict_round_trip_continues_identically() -> None:
    a = small_model()
    method_a = build("bp", [a], optimizer=OptimizerConfig(lr=0.1).factory())
    data = batches(6)
    for x, y in data[:3]:
        method_a.step(x, y)
    state = copy.deepcopy(method_a.state_dict())
    b = small_model()
    method_b = build("bp", [b], optimizer=OptimizerConfig(lr=0.1).factory())
    method_b.load_state_dict(state)
    for x, y in data[3:]:
        assert method_a.step(x, y) == method_b.step(x, y)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_other_stage_counts() -> None:
    state = build("bp", gradkit.split(small_model(), 3, balance="count")).state_dict()
    with pytest.raises(ValueError, match="3 stages"):
        build("bp", [small_model()]).load_state_dict(state)


def test_predict_uses_current_weights_without_graph() -> None:
    model = small_model().eval()
    method = build("bp", [model])
    x = torch.randn(4, 1, 4, 4)
    out = method.predict(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, model(x))


def test_lr_factor_scales_initial_rate() -> None:
    method = build("bp", [small_model()], optimizer=OptimizerConfig(lr=0.2).factory())
    method.set_lr_factor(0.5)
    method.set_lr_factor(0.25)
    assert method.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)


def test_registry_lists_bp_and_rejects_unknown_names() -> None:
    assert "bp" in METHODS.names()
    assert METHODS.get("bp") is Backprop
    with pytest.raises(ConfigError, match="choose one of: .*bp"):
        build("nosuch", [small_model()])


def test_unknown_method_option_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="does not take option 'bogus'"):
        build("bp", [small_model()], bogus=1)
