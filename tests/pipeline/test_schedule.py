"""The executed order of actions equals hand-checked tables (warm-up, steady state, drain)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit
from gradkit.methods import build
from gradkit.methods.features_replay import ReplaySchedule
from gradkit.methods.synthetic_gradients import SyntheticGradientSchedule
from gradkit.pipeline import DELTA, Action, Op, PipelineError
from gradkit.pipeline.local import LocalExecutor


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 3)),
    )


def run(name: str, steps: int, **options: object) -> list[tuple[int, int, str, int]]:
    method = build(name, gradkit.split(model(), 3, balance="count"), record_timeline=True, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        method.step(torch.randn(4, 1, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
    method.flush()
    return [(e.step, e.stage, e.op, e.batch) for e in method.executor.timeline]  # type: ignore[attr-defined]


# Features Replay, K=3, four batches, then flush. Stage k replays batch t-(2-k) with the δ stage k+1
# sent in step t-1; stage 0 waits two steps and stage 1 one step before its first update.
FR_GOLDEN = [
    # step 0: warm-up, only the last stage trains
    (0, 0, "play", 0), (0, 1, "play", 0), (0, 2, "loss", 0), (0, 2, "update", 0),
    # step 1: stage 1 replays batch 0 with the δ from step 0
    (1, 0, "play", 1), (1, 1, "play", 1), (1, 1, "replay", 0), (1, 1, "update", 0),
    (1, 2, "loss", 1), (1, 2, "update", 1),
    # step 2: full pipeline
    (2, 0, "play", 2), (2, 0, "replay", 0), (2, 0, "update", 0),
    (2, 1, "play", 2), (2, 1, "replay", 1), (2, 1, "update", 1),
    (2, 2, "loss", 2), (2, 2, "update", 2),
    (3, 0, "play", 3), (3, 0, "replay", 1), (3, 0, "update", 1),
    (3, 1, "play", 3), (3, 1, "replay", 2), (3, 1, "update", 2),
    (3, 2, "loss", 3), (3, 2, "update", 3),
    # flush: two steps without data finish batches 2 and 3
    (4, 0, "replay", 2), (4, 0, "update", 2), (4, 1, "replay", 3), (4, 1, "update", 3),
    (5, 0, "replay", 3), (5, 0, "update", 3),
]


def test_features_replay_timeline_k3() -> None:
    assert run("fr", 4) == FR_GOLDEN


def test_ddg_runs_the_same_timeline_with_kept_graphs() -> None:
    renamed = {"play": "forward", "replay": "backward"}
    assert run("ddg", 4) == [(t, k, renamed.get(op, op), b) for t, k, op, b in FR_GOLDEN]


def test_dni_timeline_with_warmup() -> None:
    # One locked warm-up step (stages wait for the true δ of the same batch and fit on it), then
    # synthetic updates; each synthesizer fits on batch t-1's true δ during step t.
    assert run("dni", 3, warmup_steps=1) == [
        (0, 0, "forward", 0), (0, 1, "forward", 0), (0, 2, "loss", 0), (0, 2, "update", 0),
        (0, 1, "backward", 0), (0, 1, "update", 0), (0, 1, "fit", 0),
        (0, 0, "backward", 0), (0, 0, "update", 0), (0, 0, "fit", 0),
        (1, 0, "forward", 1), (1, 0, "synthetic", 1), (1, 0, "update", 1),
        (1, 1, "forward", 1), (1, 1, "synthetic", 1), (1, 1, "update", 1),
        (1, 2, "loss", 1), (1, 2, "update", 1),
        (2, 0, "forward", 2), (2, 0, "synthetic", 2), (2, 0, "update", 2), (2, 0, "fit", 1),
        (2, 1, "forward", 2), (2, 1, "synthetic", 2), (2, 1, "update", 2), (2, 1, "fit", 1),
        (2, 2, "loss", 2), (2, 2, "update", 2),
        (3, 0, "fit", 2), (3, 1, "fit", 2),
    ]


def test_grid_prints_steps_by_stages() -> None:
    grid = ReplaySchedule(3).grid(3)
    assert grid.splitlines() == [
        "step  stage 0                     stage 1                     stage 2",
        "----  --------------------------  --------------------------  ----------------",
        "0     play 0                      play 0                      loss 0, update 0",
        "1     play 1                      play 1, replay 0, update 0  loss 1, update 1",
        "2     play 2, replay 0, update 0  play 2, replay 1, update 1  loss 2, update 2",
    ]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_every_batch_is_trained_once_per_stage(k: int) -> None:
    """Over the stream and the drain, each stage updates on each batch exactly once, in order."""
    schedule = ReplaySchedule(k)
    batches, last = 7, 6
    for stage in range(k):
        updates = [a.batch for t in range(batches + schedule.drain_steps())
                   for a in schedule.actions(t, stage, last if t >= batches else None) if a.op == "update"]
        assert updates == list(range(batches))
        assert schedule.first_update(stage) == k - 1 - stage


def test_dni_mixing_locks_every_step() -> None:
    schedule = SyntheticGradientSchedule(2, always_locked=True)
    assert [a.op for a in schedule.actions(5, 0)] == ["forward", "backward", "update", "fit"]


def test_a_schedule_that_cannot_progress_is_an_error_not_a_hang() -> None:
    class Stuck(ReplaySchedule):
        def actions(self, step, stage, last_batch=None):  # type: ignore[no-untyped-def]
            if stage == 0:  # waits for a δ that nobody sends, so stage 1 never gets its input either
                return [Action(Op.REPLAY, 0, ((DELTA, 1),))]
            return super().actions(step, stage, last_batch)

    with pytest.raises(PipelineError, match="no stage can proceed"):
        LocalExecutor(Stuck(2), [None, None]).run_step(0, torch.zeros(1), torch.zeros(1))  # type: ignore[list-item]


def test_schedule_command_prints_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    from gradkit.cli import main

    assert main(["schedule", "--method", "fr", "--stages", "3", "--steps", "3"]) == 0
    assert capsys.readouterr().out.strip() == ReplaySchedule(3).grid(3)
