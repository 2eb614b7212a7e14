"""fr's and ddg's default steps for stale stages (``stale_lr`` / ``stale_momentum`` = ``auto``): the
literature's remedies where a stage hands on a sequence, the paper's rule elsewhere, settled once,
also across a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit
from gradkit.errors import ConfigError
from gradkit.methods import build
from gradkit.optim import OptimizerConfig

VOCAB, LENGTH = 11, 6
REMEDIES = {"stale_lr": "inverse", "stale_momentum": 0.5}
PAPER = {"stale_lr": "none", "stale_momentum": None}


def sequence_model() -> nn.Sequential:
    """ids (N, T) -> logits (N, T, V), with (N, T, C) between its blocks."""
    torch.manual_seed(0)
    return gradkit.build_model("gpt", (LENGTH,), VOCAB, layers=2, width=16, heads=2)


def vector_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU()),
                         nn.Sequential(nn.Linear(32, 24), nn.ReLU()), nn.Sequential(nn.Linear(24, 4)))


def sequence_batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (4, LENGTH), generator=g), torch.randint(0, VOCAB, (4, LENGTH), generator=g))
            for _ in range(n)]


def vector_batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _build(name: str, model: nn.Sequential, **options: object) -> gradkit.methods.Method:
    return build(name, gradkit.split(model, 2, balance="count"),
                 optimizer=OptimizerConfig(name="adam", lr=0.01).factory(), **options)


def _steps(method: gradkit.methods.Method) -> list[tuple[float, tuple[float, float]]]:
    """(lr, betas) of each stage's optimizer (the stages', not the shared weight's)."""
    return [(opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]) for opt in method.optimizers[:2]]


def _run(method: gradkit.methods.Method, data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    return [method.step(x, y) for x, y in data]


def _same_weights(a: gradkit.methods.Method, b: gradkit.methods.Method) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_default_on_a_sequence_model_is_the_remedies_bit_for_bit(name: str) -> None:
    default, explicit = _build(name, sequence_model()), _build(name, sequence_model(), **REMEDIES)
    losses = _run(default, sequence_batches())
    assert losses == _run(explicit, sequence_batches())
    assert _same_weights(default, explicit)
    # Stage 0 (gradients one step old): half the rate, β1 0.5; the last stage as the optimizer says.
    assert _steps(default) == _steps(explicit) == [(0.005, (0.5, 0.999)), (0.01, (0.9, 0.999))]
    paper = _build(name, sequence_model(), **PAPER)
    assert _run(paper, sequence_batches()) != losses  # the paper's rule, asked for, is another run
    assert _steps(paper) == [(0.01, (0.9, 0.999)), (0.01, (0.9, 0.999))]


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_default_elsewhere_is_the_papers_rule_bit_for_bit(name: str) -> None:
    default, paper = _build(name, vector_model()), _build(name, vector_model(), **PAPER)
    assert _run(default, vector_batches()) == _run(paper, vector_batches())
    assert _same_weights(default, paper)
    assert _steps(default) == [(0.01, (0.9, 0.999)), (0.01, (0.9, 0.999))]


@pytest.mark.parametrize("saved_after", [0, 3])
def test_a_resumed_run_settles_the_steps_once(saved_after: int) -> None:
    # Saved before the first step, the steps are still to be settled; after it, they are settled
    # and must not be halved again when the run goes on.
    data = sequence_batches()
    straight = _build("fr", sequence_model())
    expected = _run(straight, data)
    first = _build("fr", sequence_model())
    losses = _run(first, data[:saved_after])
    resumed = _build("fr", sequence_model())
    resumed.load_state_dict(first.state_dict())
    losses += _run(resumed, data[saved_after:])
    assert losses == expected
    assert _same_weights(resumed, straight)
    assert _steps(resumed) == [(0.005, (0.5, 0.999)), (0.01, (0.9, 0.999))]


def test_a_checkpoint_of_the_papers_rule_keeps_it_when_resumed() -> None:
    # A run started with the paper's rule (or written before the default became auto) has no steps
    # left to settle: resuming it under the default must not change its learning rate or momentum.
    paper = _build("fr", sequence_model(), **PAPER)
    _run(paper, sequence_batches(2))
    resumed = _build("fr", sequence_model())
    resumed.load_state_dict(paper.state_dict())
    _run(resumed, sequence_batches(2))
    assert _steps(resumed) == [(0.01, (0.9, 0.999)), (0.01, (0.9, 0.999))]


def test_settling_keeps_a_schedules_factor() -> None:
    # A warm-up sets its factor before the first step; the stage's own scale multiplies it.
    method = _build("fr", sequence_model())
    method.set_lr_factor(0.1)
    _run(method, sequence_batches(1))
    assert [lr for lr, _ in _steps(method)] == pytest.approx([0.01 * 0.1 * 0.5, 0.01 * 0.1])
    method.set_lr_factor(1.0)
    assert [lr for lr, _ in _steps(method)] == pytest.approx([0.005, 0.01])


def test_each_option_settles_on_its_own() -> None:
    # An explicit stale_lr with the default momentum: the rate as given, β1 0.5 at the sequence.
    method = _build("fr", sequence_model(), stale_lr="none")
    _run(method, sequence_batches(1))
    assert _steps(method) == [(0.01, (0.5, 0.999)), (0.01, (0.9, 0.999))]
    method = _build("fr", sequence_model(), stale_momentum=None)
    _run(method, sequence_batches(1))
    assert _steps(method) == [(0.005, (0.9, 0.999)), (0.01, (0.9, 0.999))]


def test_bad_values_name_what_the_options_take() -> None:
    with pytest.raises(ConfigError, match="unknown stale_lr 'half'; choose one of: auto, none, inverse, sqrt"):
        _build("fr", vector_model(), stale_lr="half")
    with pytest.raises(ConfigError, match=r"stale_momentum must be a number in \[0, 1\) .*auto or none"):
        _build("ddg", vector_model(), stale_momentum="high")


def test_the_run_says_which_stages_got_other_steps(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="gradkit"):
        _run(_build("fr", sequence_model()), sequence_batches(2))
        _run(_build("fr", vector_model()), vector_batches(2))
    lines = [r.getMessage() for r in caplog.records if "staleness-aware" in r.getMessage()]
    assert len(lines) == 1, lines  # once, and only for the sequence model
    assert "stage 0 hands on a sequence" in lines[0] and "lr x 0.5; momentum 0.5" in lines[0]
    assert "-o stale_lr=none -o stale_momentum=none" in lines[0]
