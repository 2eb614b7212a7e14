"""gradkit.stages: split shares modules, preserves the computation, and balances sensibly."""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models import build_model
from gradkit.stages import partition, profile_blocks, split


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


# --- sharing and equivalence -------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["count", "params"])
def test_stages_share_modules_and_parameters(resnet: nn.Sequential, balance: str) -> None:
    stages = split(resnet, 3, balance=balance)
    assert len(stages) == 3 and all(isinstance(s, nn.Sequential) and len(s) for s in stages)
    blocks = [b for s in stages for b in s]
    assert len(blocks) == len(resnet)
    for j, block in enumerate(blocks):
        assert block is resnet[j]
    stage_params = [p for s in stages for p in s.parameters()]
    model_params = list(resnet.parameters())
    assert len(stage_params) == len(model_params)
    assert all(a is b for a, b in zip(stage_params, model_params, strict=True))
    # Original names are kept, so state_dict keys are a partition of the model's.
    keys = [k for s in stages for k in s.state_dict()]
    assert keys == list(resnet.state_dict())
    names = [n for s in stages for n in s._modules]
    assert names == list(resnet._modules)


def test_updating_the_model_updates_the_stages(resnet: nn.Sequential) -> None:
    stages = split(resnet, sizes=[4, 7])
    with torch.no_grad():
        resnet.head.fc.weight.add_(1.0)
    assert torch.equal(stages[1].head.fc.weight, resnet.head.fc.weight)


@pytest.mark.parametrize("train", [False, True])
def test_chained_stages_equal_model(resnet: nn.Sequential, train: bool) -> None:
    resnet.train(train)
    x = torch.randn(4, 3, 32, 32)
    stages = split(resnet, 4, balance="count")
    expected = resnet(x)
    out = x
    for stage in stages:
        out = stage(out)
    assert torch.equal(out, expected)


def test_sizes_are_honoured(resnet: nn.Sequential) -> None:
    stages = split(resnet, sizes=[1, 2, 7, 1])
    assert [len(s) for s in stages] == [1, 2, 7, 1]
    assert list(stages[0]._modules) == ["stem"]
    assert list(stages[1]._modules) == ["stage1_block1", "stage1_block2"]
    assert list(stages[3]._modules) == ["head"]


def test_one_stage_and_one_block_per_stage(resnet: nn.Sequential) -> None:
    (whole,) = split(resnet, 1, balance="count")
    assert list(whole._modules) == list(resnet._modules)
    singles = split(resnet, len(resnet), balance="params")
    assert [len(s) for s in singles] == [1] * len(resnet)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"k": 6}, "cannot split 4 blocks into 6 stages; use k <= 4"),
        ({"k": 0}, "use k between 1 and 4"),
        ({"k": -2}, "k must be >= 1"),
        ({"k": 2.0}, "use 1 <= k <= 4"),
        ({"sizes": [2, 3]}, "sizes [2, 3] sum to 5 but the model has 4 blocks; make them sum to 4"),
        ({"sizes": [2, 0, 2]}, "every stage needs at least one block"),
        ({"sizes": [5, -1]}, "every stage needs at least one block"),
        ({"sizes": []}, "summing to 4"),
        ({"sizes": 4}, "must be a list of blocks per stage summing to 4"),
        ({"sizes": [2.0, 2.0]}, "sizes must be ints"),
        ({"k": 2, "sizes": [2, 2]}, "not both"),
        ({}, "pass k (number of stages"),
        ({"k": 2, "balance": "flops"}, "use one of: count, params, time"),
        ({"k": 2, "balance": "time"}, "pass sample="),
        ({"k": 2, "balance": "time"}, "balance='params'"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, hint: str) -> None:
    model = linear_chain([4, 4, 4, 4, 4])
    with pytest.raises(ConfigError) as info:
        split(model, **kwargs)
    assert hint in str(info.value)
    assert isinstance(info.value, ValueError)


def test_integer_like_k_and_sizes_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    model = linear_chain([4, 4, 4, 4, 4])
    assert [len(s) for s in split(model, np.int64(2), balance="count")] == [2, 2]
    assert [len(s) for s in split(model, sizes=np.array([1, 3]))] == [1, 3]


def test_split_needs_sequential() -> None:
    with pytest.raises(ConfigError, match="nn.Sequential"):
        split(nn.Linear(2, 2), 1, balance="count")  # type: ignore[arg-type]


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="cannot split 2 blocks into 3 stages"):
        partition([1.0, 2.0], 3)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        partition([1.0, -2.0], 1)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        partition([1.0, float("nan")], 1)


# --- partition ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("costs", "k", "sizes"),
    [
        ([1, 1, 1, 10], 2, [3, 1]),
        ([10, 1, 1, 1], 2, [1, 3]),
        ([1, 1, 1, 1], 2, [2, 2]),
        ([1] * 7, 3, [3, 2, 2]),  # as even as possible, earlier stages take the remainder
        ([1] * 5, 5, [1] * 5),
        ([3, 1, 4, 1, 5], 1, [5]),
        ([0, 0, 0], 2, [2, 1]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [5, 2, 2]),  # 15 | 13 | 17: max 17 is optimal
    ],
)
def test_partition_examples(costs: list[float], k: int, sizes: list[int]) -> None:
    assert partition(costs, k) == sizes


def _brute_force_max(costs: list[float], k: int) -> float:
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]
        sizes = partition(costs, k)
        assert len(sizes) == k and all(s >= 1 for s in sizes) and sum(sizes) == n
        bounds = list(itertools.accumulate([0, *sizes]))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        assert worst == _brute_force_max(costs, k), (costs, k, sizes)


def test_partition_is_fast_enough_for_deep_models() -> None:
    # resnet164 has 83 blocks; the O(k n^2) programme must stay well under a second.
    sizes = partition([float(i % 7 + 1) for i in range(83)], 8)
    assert sum(sizes) == 83 and len(sizes) == 8


# --- balancing ---------------------------------------------------------------------------------


def test_count_balance(resnet: nn.Sequential) -> None:
    assert [len(s) for s in split(resnet, 3, balance="count")] == [4, 4, 3]


def test_params_balance() -> None:
    model = linear_chain([10, 10, 10, 10, 1000])  # 110, 110, 110, 11000 parameters
    assert [len(s) for s in split(model, 2, balance="params")] == [3, 1]
    reversed_model = linear_chain([1000, 10, 10, 10, 10])  # 10010, 110, 110, 110
    assert [len(s) for s in split(reversed_model, 2, balance="params")] == [1, 3]


def test_params_balance_on_resnet(resnet: nn.Sequential) -> None:
    counts = [sum(p.numel() for p in b.parameters()) for b in resnet]
    sizes = [len(s) for s in split(resnet, 2, balance="params")]
    assert sizes == partition(counts, 2)
    # Stage 3 blocks hold most parameters, so the first stage takes far more blocks.
    assert sizes[0] > sizes[1]


class Heavy(nn.Module):
    """Far more compute than a small Linear, with the same input and output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 1024)
        self.mid = nn.Linear(1024, 1024)
        self.down = nn.Linear(1024, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        for _ in range(4):
            h = torch.relu(self.mid(h))
        return self.down(h)


@pytest.mark.parametrize(("heavy_at", "sizes"), [(0, [1, 3]), (3, [3, 1])])
def test_time_balance_isolates_the_slow_block(heavy_at: int, sizes: list[int]) -> None:
    torch.manual_seed(0)
    blocks = [nn.Linear(32, 32) for _ in range(3)]
    blocks.insert(heavy_at, Heavy())
    model = nn.Sequential(*blocks)
    sample = torch.randn(256, 32)
    times = profile_blocks(model, sample)
    assert len(times) == 4 and all(t > 0 for t in times)
    light = max(t for i, t in enumerate(times) if i != heavy_at)
    assert times[heavy_at] > 5 * light
    assert [len(s) for s in split(model, 2, balance="time", sample=sample)] == sizes


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

    times = profile_blocks(resnet, sample, repeats=2)

    assert len(times) == len(resnet) and all(t > 0 for t in times)
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


def test_time_balance_on_resnet(resnet: nn.Sequential) -> None:
    before = {k: v.clone() for k, v in resnet.named_buffers()}
    stages = split(resnet, 3, balance="time", sample=torch.randn(8, 3, 32, 32))
    assert len(stages) == 3 and sum(len(s) for s in stages) == len(resnet)
    assert all(torch.equal(v, before[k]) for k, v in resnet.named_buffers())


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


# --- partition with a separate last group and cut costs; split(method=...) ----------------------


def test_partition_without_the_new_terms_is_unchanged() -> None:
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.random() * 10 for _ in range(n)]
        plain = partition(costs, k)
        assert partition(costs, k, last_costs=None, cut_costs=None) == plain
        assert partition(costs, k, last_costs=costs) == plain
        assert partition(costs, k, cut_costs=[0.0] * (n - 1)) == plain


def _brute_force_general(costs: list[float], last: list[float], cuts: list[float], k: int) -> float:
    n, best = len(costs), float("inf")
    for chosen in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *chosen, n)
        worst = 0.0
        for a, b in itertools.pairwise(bounds):
            c = sum((last if b == n else costs)[a:b])
            c += (cuts[a - 1] if a > 0 else 0.0) + (cuts[b - 1] if b < n else 0.0)
            worst = max(worst, c)
        best = min(best, worst)
    return best


def test_partition_with_last_and_cut_costs_is_optimal_against_brute_force() -> None:
    rng = random.Random(4)
    for _ in range(200):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]  # integers: exact sums
        last = [float(rng.randint(0, 20)) for _ in range(n)]
        cuts = [float(rng.randint(0, 6)) for _ in range(n - 1)]
        sizes = partition(costs, k, last_costs=last, cut_costs=cuts)
        assert len(sizes) == k and min(sizes) >= 1 and sum(sizes) == n
        bounds = list(itertools.accumulate([0, *sizes]))
        worst = max(
            sum((last if b == n else costs)[a:b])
            + (cuts[a - 1] if a > 0 else 0.0)
            + (cuts[b - 1] if b < n else 0.0)
            for a, b in itertools.pairwise(bounds)
        )
        assert worst == _brute_force_general(costs, last, cuts, k), (costs, last, cuts, k)


def test_partition_checks_the_new_cost_lists() -> None:
    with pytest.raises(ConfigError, match="last_costs has 1 entries, need 2"):
        partition([1.0, 2.0], 1, last_costs=[1.0])
    with pytest.raises(ConfigError, match="cut_costs has 2 entries, need 1"):
        partition([1.0, 2.0], 1, cut_costs=[1.0, 1.0])
    with pytest.raises(ConfigError, match="cut_costs must be finite and >= 0"):
        partition([1.0, 2.0], 2, cut_costs=[-1.0])


def _fake_measure(monkeypatch: pytest.MonkeyPatch, parts: list[tuple[float, float, int]]) -> None:
    """Deterministic block timings for both profilers (they share ``measure_blocks``)."""
    import gradkit.distributed.cost_model as cost_model
    import gradkit.stages as stages_module

    def fake(model: nn.Sequential, sample: torch.Tensor, repeats: int = 3) -> list:
        assert len(parts) == len(model)
        return list(parts)

    monkeypatch.setattr(stages_module, "measure_blocks", fake)
    monkeypatch.setattr(cost_model, "measure_blocks", fake)


def test_split_method_none_is_todays_split(monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear_chain([4] * 11)
    sample = torch.randn(2, 4)
    _fake_measure(monkeypatch, [(2.0, 2.0, 16)] * 10)
    for balance in ("count", "params", "time"):
        plain = [len(s) for s in split(model, 2, balance=balance, sample=sample)]
        assert [
            len(s) for s in split(model, 2, balance=balance, sample=sample, method=None)
        ] == plain
    assert plain == partition([4.0] * 10, 2) == [5, 5]


def test_split_method_fr_pays_the_replay_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradkit.distributed.cost_model import balanced_sizes, profile_block_costs

    model = linear_chain([4] * 11)
    sample = torch.randn(2, 4)
    # 2 s forward, 2 s backward, tiny messages: FR's early stage costs 6 s a block, the last 4 s.
    _fake_measure(monkeypatch, [(2.0, 2.0, 16)] * 10)
    sizes = [len(s) for s in split(model, 2, sample=sample, method="fr")]
    assert sizes == [4, 6]
    assert sizes == balanced_sizes(profile_block_costs(model, sample), 2, "fr")
    assert [len(s) for s in split(model, 2, sample=sample, method="ddg")] == [5, 5]


def test_split_method_errors() -> None:
    model = linear_chain([4, 4, 4, 4])
    with pytest.raises(ConfigError, match="use one of: fr, ddg, dni, bp"):
        split(model, 2, sample=torch.randn(2, 4), method="gpipe")
    with pytest.raises(ConfigError, match="needs balance='time'"):
        split(model, 2, balance="count", method="fr")
    with pytest.raises(ConfigError, match="pass sample="):
        split(model, 2, method="fr")
