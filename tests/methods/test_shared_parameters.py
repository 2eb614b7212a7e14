"""Parameters that several stages use (issue 14, item 2): found by ``shared_parameters``, kept in one
optimizer, and updated once per step with the sum of the gradients of all their uses."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy
from gradkit.methods import build
from gradkit.models import build_model
from gradkit.optim import OptimizerConfig
from gradkit.stages import shared_parameters, split

VOCAB, T = 12, 8
TIED = ("embed.token.weight", "head.proj.weight")


def tiny_gpt() -> nn.Sequential:
    torch.manual_seed(0)
    return build_model("gpt", (T,), VOCAB, layers=2, width=16, heads=2)


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (4, T), generator=g), torch.randint(0, VOCAB, (4, T), generator=g))
            for _ in range(n)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_split_finds_the_tied_embedding_and_a_block_used_twice() -> None:
    model = tiny_gpt()
    first, last = split(model, sizes=[2, 2])
    shared = shared_parameters([first, last])
    assert [(s.stages, s.names) for s in shared] == [((0, 1), TIED)]
    assert shared[0].param is model.get_submodule("embed.token").weight
    assert shared_parameters([model]) == []  # one stage: nothing is shared between stages

    block = nn.Linear(4, 4)
    twice = nn.Sequential(block, nn.ReLU(), block)
    found = shared_parameters(split(twice, sizes=[1, 2]))
    assert [(s.stages, s.names) for s in found] == [((0, 1), ("0.weight", "2.weight")), ((0, 1), ("0.bias", "2.bias"))]


@pytest.mark.parametrize("opt", [OptimizerConfig(name="sgd", lr=0.1, weight_decay=5e-4),
                                 OptimizerConfig(name="adam", lr=0.01)], ids=["sgd", "adam"])
@pytest.mark.parametrize("name, options", [("bp", {}), ("dni", {"warmup_steps": 100})], ids=["bp", "dni-locked"])
def test_stage_pipeline_with_a_tied_weight_is_backprop_bit_for_bit(
        name: str, options: dict, opt: OptimizerConfig) -> None:
    """bp's stage pipeline (and DNI while it waits for the true δ) apply g_embedding + g_head once."""
    ref_model, model = tiny_gpt(), tiny_gpt()
    reference = build("bp", [ref_model], optimizer=opt.factory())
    method = build(name, split(model, sizes=[2, 2]), optimizer=opt.factory(), stage_parallel=True, **options)
    for x, y in batches():
        assert method.step(x, y) == reference.step(x, y)
    assert same_weights(model, ref_model)


def _holders(method: object, p: torch.Tensor) -> list[torch.optim.Optimizer]:
    return [opt for opt in method.optimizers  # type: ignore[attr-defined]
            for group in opt.param_groups for q in group["params"] if q is p]


@pytest.mark.parametrize("name", ["bp", "fr", "ddg", "dni"])
def test_one_optimizer_state_per_shared_parameter(name: str) -> None:
    model = tiny_gpt()
    tied = model.get_submodule("embed.token").weight
    method = build(name, split(model, sizes=[2, 2]), optimizer=OptimizerConfig(name="adam", lr=0.01).factory(),
                   stage_parallel=True)
    for x, y in batches(4):
        method.step(x, y)
    method.flush()
    assert _holders(method, tied) == [method.shared.optimizer]  # type: ignore[attr-defined]
    assert sum(tied in opt.state for opt in method.optimizers) == 1
    # One update per pipeline step that computed a gradient: 4 batches, plus FR's and DDG's drain step
    # (stage 0's last replay); DNI's drain step only fits its synthesizer.
    steps = {"bp": 4, "fr": 5, "ddg": 5, "dni": 4}[name]
    assert int(method.shared.optimizer.state[tied]["step"]) == steps  # type: ignore[attr-defined]
    for p in model.parameters():  # and every other parameter in exactly one optimizer too
        assert len(_holders(method, p)) == 1


def _per_use_grads(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tied weight's gradient from its use as the embedding and from its use as the output head."""
    params = {n: p.detach().clone().requires_grad_(True)
              for n, p in model.named_parameters(remove_duplicate=False)}
    loss = cross_entropy(functional_call(model, params, (x,), tie_weights=False), y)
    embedding, head = torch.autograd.grad(loss, [params[TIED[0]], params[TIED[1]]])
    return embedding, head


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_frozen_weights_apply_the_sum_of_both_uses_once_per_step(name: str) -> None:
    """With lr 0 the stale δ is exact. With K=2 the head (last stage) trains on batch t while the
    embedding (stage 0) replays batch t-1, so step t applies g_head(t) + g_embedding(t-1), by hand."""
    model = tiny_gpt()
    tied = model.get_submodule("embed.token").weight
    method = build(name, split(model, sizes=[2, 2]),
                   optimizer=OptimizerConfig(lr=0.0, momentum=0.9, weight_decay=5e-4).factory())
    applied: list[torch.Tensor] = []
    method.update_observers.append(
        lambda stage, batch, params: applied.extend(p.grad.clone() for p in params if p is tied))
    data = batches(4)
    for x, y in data:
        method.step(x, y)
    method.flush()
    uses = [_per_use_grads(model, x, y) for x, y in data]
    expected = [uses[0][1]] + [uses[t][1] + uses[t - 1][0] for t in range(1, len(data))] + [uses[-1][0]]
    assert len(applied) == len(expected)
    for got, want in zip(applied, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_stage_whose_only_parameters_are_shared_still_trains() -> None:
    def block_used_twice() -> nn.Sequential:
        torch.manual_seed(0)
        block = nn.Linear(6, 6)
        return nn.Sequential(nn.Linear(4, 6), block, nn.Tanh(), block, nn.Linear(6, 3))

    model, ref = block_used_twice(), block_used_twice()
    # Stage 1 is (Tanh, the block's second use): no parameter of its own.
    opt = OptimizerConfig(lr=0.1)
    method = build("bp", split(model, sizes=[2, 2, 1]), optimizer=opt.factory(), stage_parallel=True)
    plain = build("bp", [ref], optimizer=opt.factory())
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
        assert method.step(x, y) == plain.step(x, y)
    assert same_weights(model, ref)


@pytest.mark.parametrize("shards", [False, True], ids=["state_dict", "shards"])
def test_resume_mid_pipeline_restores_the_shared_optimizer(shards: bool) -> None:
    """The shared parameter's optimizer state is saved (in every holder's shard with --workers) and a
    resumed run continues bit for bit."""
    data = batches(6)
    opt = OptimizerConfig(name="adam", lr=0.01)
    a = build("fr", split(tiny_gpt(), sizes=[2, 2]), optimizer=opt.factory())
    losses_a = [a.step(x, y) for x, y in data]

    b = build("fr", split(tiny_gpt(), sizes=[2, 2]), optimizer=opt.factory())
    losses_b = [b.step(x, y) for x, y in data[:3]]
    buf = io.BytesIO()
    torch.save([b.shard_state(k) for k in range(2)] if shards else b.state_dict(), buf)  # type: ignore[attr-defined]
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    c = build("fr", split(build_model("gpt", (T,), VOCAB, layers=2, width=16, heads=2), sizes=[2, 2]),
              optimizer=opt.factory())
    if shards:
        for k, shard in enumerate(state):
            c.load_shard_state(k, shard)  # type: ignore[attr-defined]
    else:
        c.load_state_dict(state)
    losses_b += [c.step(x, y) for x, y in data[3:]]
    assert losses_b == losses_a
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_with_another_number_of_optimizers_is_a_config_error() -> None:
    """A checkpoint written while the tied weight sat in two stage optimizers (no shared optimizer)."""
    method = build("fr", split(tiny_gpt(), sizes=[2, 2]))
    state = method.state_dict()
    state["optimizers"] = state["optimizers"][:-1]
    with pytest.raises(ConfigError, match="holds 2 optimizer states but fr on this model has 3.*start a new run"):
        method.load_state_dict(state)
