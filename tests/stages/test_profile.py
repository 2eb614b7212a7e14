"""gradkit.stages.profile: one profiler, forward and backward apart, the model left as it was."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models import build_model
from gradkit.stages import BlockCost, profile_blocks
from gradkit.stages.cost_model import backprop_seconds


@pytest.fixture
def resnet() -> nn.Sequential:
    torch.manual_seed(0)
    return build_model("resnet20", (3, 32, 32), 10)


def linear_chain(widths: list[int]) -> nn.Sequential:
    """Blocks Linear(w[i], w[i+1]) named b0, b1, ...: parameter counts are easy to control."""
    return nn.Sequential(
        OrderedDict(
            (f"b{i}", nn.Linear(a, b)) for i, (a, b) in enumerate(itertools.pairwise(widths))
        )
    )


def test_backward_is_timed_even_under_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    model = linear_chain([8, 8, 8, 8])
    with torch.no_grad():
        profile_blocks(model, torch.randn(4, 8), repeats=2)
    assert len(calls) == 3 * (2 + 1)  # 3 blocks x (2 timed + 1 warm-up) backward passes


def test_time_profiling_leaves_the_model_as_it_was(resnet: nn.Sequential) -> None:
    resnet.eval()
    resnet.stage2_block1.train()  # a mixed mode must come back as it was, too
    buffers = {k: v.clone() for k, v in resnet.named_buffers()}
    params = {k: v.detach().clone() for k, v in resnet.named_parameters()}
    kept_grad = torch.full_like(resnet.head.fc.weight, 7.0)
    resnet.head.fc.weight.grad = kept_grad
    modes = {n: m.training for n, m in resnet.named_modules()}
    sample = torch.randn(8, 3, 32, 32)
    rng = torch.get_rng_state()

    costs = profile_blocks(resnet, sample, repeats=2)

    assert len(costs) == len(resnet) and all(c.total_s > 0 for c in costs)
    for k, v in resnet.named_buffers():
        assert torch.equal(v, buffers[k]), f"buffer {k} changed"
    for k, p in resnet.named_parameters():
        assert torch.equal(p, params[k])
        if p is resnet.head.fc.weight:
            assert p.grad is kept_grad and torch.equal(p.grad, torch.full_like(p, 7.0))
        else:
            assert p.grad is None, f"{k} got a .grad"
    assert {n: m.training for n, m in resnet.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


class TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_profiling_a_tuple_block_raises_and_restores() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), TupleOut())
    before = model[0].running_mean.clone()
    with pytest.raises(ConfigError, match="balance='params'"):
        profile_blocks(model, torch.randn(8, 4) + 3)
    assert torch.equal(model[0].running_mean, before)
    assert int(model[0].num_batches_tracked) == 0


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet20", (3, 32, 32)), ("mlp", (1, 8, 8))], ids=["resnet20", "mlp"]
)
def test_profile_blocks_leaves_the_model_and_threads_alone(
    name: str, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    threads = torch.get_num_threads()
    sample = torch.randn(4, *shape)

    costs = profile_blocks(model, sample, threads=1, repeats=2)

    assert torch.get_num_threads() == threads
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert len(costs) == len(model) and all(isinstance(c, BlockCost) for c in costs)
    assert all(c.forward_s > 0 and c.backward_s > 0 for c in costs)  # every block has weights
    assert all(c.total_s == c.forward_s + c.backward_s for c in costs)
    x = sample
    with torch.no_grad():
        for block, cost in zip(model, costs, strict=True):
            x = block(x)
            assert cost.output_bytes == x.numel() * x.element_size()
    assert backprop_seconds(costs) > 0


def test_profile_blocks_uses_and_restores_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradkit.stages.profile as profile_module

    seen = []

    def fake(model: nn.Sequential, sample: torch.Tensor, repeats: int) -> list[BlockCost]:
        seen.append(torch.get_num_threads())
        return [BlockCost(1.0, 1.0, 4)]

    monkeypatch.setattr(profile_module, "_measure_blocks", fake)
    threads = torch.get_num_threads()
    model = nn.Sequential(nn.Linear(2, 2))
    profile_blocks(model, torch.randn(1, 2), threads=1)
    profile_blocks(model, torch.randn(1, 2))
    assert seen == [1, threads] and torch.get_num_threads() == threads


def test_profile_blocks_restores_threads_after_an_error() -> None:
    threads = torch.get_num_threads()
    with pytest.raises(ConfigError, match="not a tensor"):
        profile_blocks(nn.Sequential(nn.Linear(4, 4), TupleOut()), torch.randn(2, 4), threads=1)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": 0}, "threads must be an int >= 1"), ({"threads": True}, "threads must be"),
     ({"repeats": 0}, "repeats must be >= 1")],
)
def test_profile_blocks_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        profile_blocks(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2), **kwargs)


def test_profile_block_costs_is_a_deprecated_alias() -> None:
    from gradkit.stages.cost_model import profile_block_costs

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    with pytest.warns(DeprecationWarning, match="gradkit.stages.profile_blocks"):
        costs = profile_block_costs(model, torch.randn(1, 2), threads=1, repeats=1)
    assert [c.output_bytes for c in costs] == [8, 12]
