"""gradkit.stages.split: split shares modules, preserves the computation, and balances sensibly."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models import build_model
from gradkit.stages import (
    BlockCost,
    balanced_sizes,
    check_stage_sizes,
    choose_sizes,
    partition,
    profile_blocks,
    split,
)


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
    times = [c.total_s for c in profile_blocks(model, sample)]
    assert len(times) == 4 and all(t > 0 for t in times)
    light = max(t for i, t in enumerate(times) if i != heavy_at)
    assert times[heavy_at] > 5 * light
    assert [len(s) for s in split(model, 2, balance="time", sample=sample)] == sizes


def test_time_balance_on_resnet(resnet: nn.Sequential) -> None:
    before = {k: v.clone() for k, v in resnet.named_buffers()}
    stages = split(resnet, 3, balance="time", sample=torch.randn(8, 3, 32, 32))
    assert len(stages) == 3 and sum(len(s) for s in stages) == len(resnet)
    assert all(torch.equal(v, before[k]) for k, v in resnet.named_buffers())


# --- split(method=...) -------------------------------------------------------------------------


def _fake_measure(monkeypatch: pytest.MonkeyPatch, parts: list[tuple[float, float, int]]) -> None:
    """Deterministic block timings for every caller of the one profiler."""
    import gradkit.stages.profile as profile_module

    def fake(model: nn.Sequential, sample: torch.Tensor, repeats: int) -> list[BlockCost]:
        assert len(parts) == len(model)
        return [BlockCost(*p) for p in parts]

    monkeypatch.setattr(profile_module, "_measure_blocks", fake)


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
    model = linear_chain([4] * 11)
    sample = torch.randn(2, 4)
    # 2 s forward, 2 s backward, tiny messages: FR's early stage costs 6 s a block, the last 4 s.
    _fake_measure(monkeypatch, [(2.0, 2.0, 16)] * 10)
    sizes = [len(s) for s in split(model, 2, sample=sample, method="fr")]
    assert sizes == [4, 6]
    assert sizes == balanced_sizes(profile_blocks(model, sample), 2, "fr")
    assert [len(s) for s in split(model, 2, sample=sample, method="ddg")] == [5, 5]


def test_split_method_errors() -> None:
    model = linear_chain([4, 4, 4, 4])
    with pytest.raises(ConfigError, match="unknown method 'gpipe' for the cost model; use one of: bp, fr, ddg, dni"):
        split(model, 2, sample=torch.randn(2, 4), method="gpipe")
    with pytest.raises(ConfigError, match="needs balance='time'"):
        split(model, 2, balance="count", method="fr")
    with pytest.raises(ConfigError, match="pass sample="):
        split(model, 2, method="fr")


# --- choose_sizes: the split a training run uses ------------------------------------------------


def _choose(model: nn.Sequential, **overrides: object) -> list[int]:
    options: dict = {
        "stages": 2,
        "balance": "count",
        "stage_sizes": None,
        "sample": None,
        "method": None,
        "model_name": "chain",
        **overrides,
    }
    return choose_sizes(model, **options)


def test_choose_sizes_follows_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear_chain([4] * 11)
    assert _choose(model, stages=1) == [10]
    assert _choose(model, stages=1, balance="time") == [10]  # one stage: nothing to profile
    assert _choose(model, stages=3) == [4, 3, 3]
    assert _choose(model, stages=3, stage_sizes=(1, 2, 7)) == [1, 2, 7]
    assert _choose(model, stages=2, balance="params", method="fr") == [5, 5]  # method needs time
    sample = torch.randn(2, 4)
    _fake_measure(monkeypatch, [(2.0, 2.0, 16)] * 10)
    assert _choose(model, balance="time", sample=sample) == [5, 5]
    assert _choose(model, balance="time", sample=sample, method="fr") == [4, 6]
    assert _choose(model, balance="time", sample=sample, method="ddg") == [5, 5]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"stages": 11},
            "--stages 11 is more than the 10 blocks of chain; use --stages <= 10",
        ),
        (
            {"stages": 2, "stage_sizes": (4, 4)},
            "--stage-sizes 4,4 adds up to 8 blocks but chain has 10; give block counts that sum to 10",
        ),
        ({"balance": "time"}, "pass sample="),
        ({"balance": "time", "sample": torch.randn(2, 4), "method": "ulr"}, "use one of: bp, "),
    ],
)
def test_choose_sizes_errors_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _choose(linear_chain([4] * 11), **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_check_stage_sizes_reads_the_config() -> None:
    config = SimpleNamespace(stage_sizes=(3, 1), model="mlp")
    assert check_stage_sizes(config, 4) == [3, 1]
    with pytest.raises(ConfigError, match="--stage-sizes 3,1 adds up to 4 blocks but mlp has 5"):
        check_stage_sizes(config, 5)


def test_balances_are_defined_once() -> None:
    import gradkit.config
    import gradkit.stages

    assert gradkit.config.BALANCES is gradkit.stages.BALANCES
    assert gradkit.stages.BALANCES == ("count", "params", "time")
