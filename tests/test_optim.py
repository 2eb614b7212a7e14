"""Schedules and optimizer/run configuration validation."""

from __future__ import annotations

import pytest
import torch

from gradkit.config import TrainConfig
from gradkit.errors import ConfigError
from gradkit.optim import LRSchedule, OptimizerConfig


def test_cosine_goes_from_one_to_zero() -> None:
    s = LRSchedule(kind="cosine")
    assert s.factor(0, total_epochs=10) == 1.0
    assert s.factor(5, total_epochs=10) == pytest.approx(0.5)
    assert s.factor(10, total_epochs=10) == pytest.approx(0.0)


def test_multistep_decays_at_milestones_and_defaults_to_half_and_three_quarters() -> None:
    s = LRSchedule(kind="multistep", milestones=(150, 225))
    assert s.factor(149.9, total_epochs=300) == 1.0
    assert s.factor(150, total_epochs=300) == pytest.approx(0.1)
    assert s.factor(225, total_epochs=300) == pytest.approx(0.01)
    default = LRSchedule(kind="multistep")
    assert default.factor(4.5, total_epochs=8) == pytest.approx(0.1)
    assert default.factor(6, total_epochs=8) == pytest.approx(0.01)


def test_optimizer_factory_builds_configured_optimizers() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = OptimizerConfig(name="sgd", lr=0.1, momentum=0.8, weight_decay=1e-4).factory()(params)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.8, True, 1e-4)
    adam = OptimizerConfig(name="adam", lr=1e-3).factory()(params)
    assert isinstance(adam, torch.optim.Adam)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"lr_schedule": "step"}, "choose one of: constant, multistep, cosine"),
        ({"resume": True}, "--resume needs --out"),
        ({"momentum": 0.0}, "Nesterov momentum needs momentum > 0"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_default_lr_depends_on_optimizer() -> None:
    assert TrainConfig(optimizer="sgd").effective_lr == 0.05
    assert TrainConfig(optimizer="adam").effective_lr == 0.001


def test_warmup_is_linear_in_steps_then_follows_the_schedule() -> None:
    s = LRSchedule(kind="cosine", warmup_steps=4)
    # 10 steps per epoch: progress 0.1 is step 1, whose factor is 2/4 of cosine's there.
    assert s.factor(0.0, total_epochs=2, steps_per_epoch=10) == pytest.approx(0.25)
    assert s.factor(0.1, total_epochs=2, steps_per_epoch=10) == pytest.approx(
        0.5 * LRSchedule(kind="cosine").factor(0.1, total_epochs=2))
    assert s.factor(0.3, total_epochs=2, steps_per_epoch=10) == pytest.approx(
        LRSchedule(kind="cosine").factor(0.3, total_epochs=2))
    assert LRSchedule(kind="constant").factor(0.0, total_epochs=2, steps_per_epoch=10) == 1.0


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_warmup_is_a_one_line_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="--warmup-steps must be an integer >= 0"):
        TrainConfig(warmup_steps=bad)  # type: ignore[arg-type]
