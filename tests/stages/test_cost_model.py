"""gradkit.stages.cost_model: hand-computed predictions, exact balancing, choosing K."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gradkit.errors import ConfigError
from gradkit.methods import PipelineMethod, stage_parallel_class, stage_parallel_names
from gradkit.stages import BlockCost, partition
from gradkit.stages.cost_model import (
    backprop_seconds,
    balanced_sizes,
    choose_stages,
    predict_speedups,
    predict_stages,
    predict_step_seconds,
)

FREE = {"bandwidth_bytes_per_s": math.inf, "latency_s": 0.0}


def uniform(
    n: int, forward: float = 1.0, backward: float = 2.0, nbytes: int = 1000
) -> list[BlockCost]:
    return [BlockCost(forward, backward, nbytes) for _ in range(n)]


def compositions(n: int, k: int) -> list[list[int]]:
    """Every way to cut n blocks into k non-empty consecutive groups."""
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        out.append([b - a for a, b in itertools.pairwise(bounds)])
    return out


# --- predictions by hand -----------------------------------------------------------------------


def test_predictions_for_uniform_blocks_by_hand() -> None:
    costs = uniform(4)  # F=1, B=2; a message of 1000 bytes takes 0.5 + 1000/1000 = 1.5 s
    link = {"bandwidth_bytes_per_s": 1000.0, "latency_s": 0.5}
    msg = 1.5
    # K=2, [2, 2]. FR: stage 0 plays and replays (2F+B per block), stage 1 does F+B.
    fr = predict_stages("fr", costs, [2, 2], **link)
    assert [(s.compute_s, s.comm_s) for s in fr] == [(8.0, msg), (6.0, msg)]
    assert predict_step_seconds("fr", costs, [2, 2], **link) == max(2 * 2 + 2 * 2 + msg, 6 + msg)
    assert predict_step_seconds("ddg", costs, [2, 2], **link) == 6 + msg
    assert predict_step_seconds("dni", costs, [2, 2], **link) == 6 + msg
    dni = predict_step_seconds("dni", costs, [2, 2], synthesizer_fraction=0.5, **link)
    assert dni == 9 + msg  # the synthesizer is paid by stage 0 only (the last has the loss)
    # bp is backward-locked: all compute, plus the activation up and the δ down.
    assert predict_step_seconds("bp", costs, [2, 2], **link) == 12 + 2 * msg
    # K=3, [2, 1, 1]: the middle stage sends two messages.
    mid = predict_stages("fr", costs, [2, 1, 1], **link)
    assert [(s.compute_s, s.comm_s) for s in mid] == [(8.0, msg), (4.0, 2 * msg), (3.0, msg)]
    assert predict_step_seconds("fr", costs, [2, 1, 1], **link) == 9.5
    assert predict_step_seconds("bp", costs, [2, 1, 1], **link) == 12 + 4 * msg


def test_message_size_is_the_output_at_the_cut() -> None:
    costs = [BlockCost(1, 1, 100), BlockCost(1, 1, 300), BlockCost(1, 1, 7)]
    link = {"bandwidth_bytes_per_s": 100.0, "latency_s": 0.0}
    stages = predict_stages("ddg", costs, [1, 2], **link)
    assert [s.comm_s for s in stages] == [1.0, 1.0]  # block 0's 100 bytes, both ways
    stages = predict_stages("ddg", costs, [2, 1], **link)
    assert [s.comm_s for s in stages] == [3.0, 3.0]
    assert [s.blocks for s in stages] == [2, 1] and stages[1].total_s == 5.0


# --- balancing ---------------------------------------------------------------------------------


def random_costs(rng: random.Random, n: int) -> list[BlockCost]:
    # Small integers: every sum is exact in floating point, so optimal values compare with ==.
    return [
        BlockCost(float(rng.randint(0, 6)), float(rng.randint(0, 9)), rng.randint(0, 5))
        for _ in range(n)
    ]


@pytest.mark.parametrize("method", ["fr", "ddg", "dni"])
def test_balanced_sizes_is_optimal_against_brute_force(method: str) -> None:
    rng = random.Random(1)
    for _ in range(120):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = random_costs(rng, n)
        link = {"bandwidth_bytes_per_s": 1.0, "latency_s": float(rng.randint(0, 2))}
        opts = {**link, "synthesizer_fraction": 1.0 if method == "dni" else 0.0}
        sizes = balanced_sizes(costs, k, method, **opts)
        assert len(sizes) == k and min(sizes) >= 1 and sum(sizes) == n
        got = predict_step_seconds(method, costs, sizes, **opts)
        best = min(predict_step_seconds(method, costs, s, **opts) for s in compositions(n, k))
        assert got == best, (method, costs, k, sizes)


def test_bp_balancing_sends_the_fewest_bytes_against_brute_force() -> None:
    rng = random.Random(2)
    link = {"bandwidth_bytes_per_s": 3.0, "latency_s": 0.25}
    for _ in range(120):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = random_costs(rng, n)
        sizes = balanced_sizes(costs, k, "bp", **link)
        got = predict_step_seconds("bp", costs, sizes, **link)
        best = min(predict_step_seconds("bp", costs, s, **link) for s in compositions(n, k))
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12), (costs, k, sizes)


def test_bp_balancing_evens_the_stages_when_messages_are_alike() -> None:
    assert balanced_sizes(uniform(8), 2, "bp") == [4, 4]
    assert balanced_sizes(uniform(8), 4, "bp", **FREE) == [2, 2, 2, 2]


def test_fr_balancing_gives_early_stages_fewer_blocks() -> None:
    # F=2, B=2: early FR stages cost 6 per block (play + replay), the last 4, so 4 | 6 is exact.
    costs = uniform(10, forward=2.0, backward=2.0)
    plain = partition([c.forward_s + c.backward_s for c in costs], 2)
    assert plain == [5, 5]
    assert balanced_sizes(costs, 2, "ddg", **FREE) == plain
    assert balanced_sizes(costs, 2, "fr", **FREE) == [4, 6]
    assert predict_step_seconds("fr", costs, [4, 6], **FREE) == 24.0  # 4 x 6 | 6 x 4
    assert predict_step_seconds("fr", costs, plain, **FREE) == 30.0  # 5 x 6 | 5 x 4
    # Also with three stages: the early stages together hold fewer blocks than plain balancing's.
    three = balanced_sizes(uniform(12, 2.0, 2.0), 3, "fr", **FREE)
    assert sum(three[:-1]) < sum(partition([4.0] * 12, 3)[:-1])


def test_balancing_avoids_cutting_at_a_large_activation() -> None:
    # Cutting after block 1 sends 1000 bytes each way; after block 2 only 1 byte.
    costs = [BlockCost(1, 1, 1), BlockCost(1, 1, 1000), BlockCost(1, 1, 1), BlockCost(1, 1, 1)]
    link = {"bandwidth_bytes_per_s": 100.0, "latency_s": 0.0}
    assert balanced_sizes(costs, 2, "ddg", **FREE) == [2, 2]
    assert balanced_sizes(costs, 2, "ddg", **link) == [3, 1]
    assert balanced_sizes(costs, 2, "bp", **link) in ([1, 3], [3, 1])


# --- choosing K --------------------------------------------------------------------------------


def test_choose_stages_keeps_one_process_when_messages_are_expensive() -> None:
    costs = uniform(8)
    choice = choose_stages(
        costs, 4, "fr", single_process_s=24.0, bandwidth_bytes_per_s=1.0, latency_s=100.0
    )
    assert choice.k == 1 and choice.sizes == [8]
    assert choice.speedup == 1.0 and choice.step_s == 24.0
    assert [c.k for c in choice.candidates] == [1, 2, 3, 4]
    assert all(c.speedup < 1 for c in choice.candidates[1:])


@pytest.mark.parametrize(("method", "speedup"), [("fr", 3.0), ("ddg", 4.0), ("dni", 4.0)])
def test_choose_stages_uses_every_worker_when_messages_are_free(
    method: str, speedup: float
) -> None:
    choice = choose_stages(uniform(8), 4, method, single_process_s=24.0, **FREE)
    assert choice.k == 4 and sum(choice.sizes) == 8
    assert choice.speedup == speedup  # FR: the early stages' 2F+B = 4 per block, 2 blocks each
    assert choice.best is choice.candidates[-1]


def test_choose_stages_never_splits_bp_for_speed() -> None:
    choice = choose_stages(uniform(8), 4, "bp", single_process_s=24.0, **FREE)
    assert choice.k == 1  # backward-locked: a split adds messages and overlaps nothing


def test_choose_stages_is_limited_by_the_blocks() -> None:
    choice = choose_stages(uniform(3), 8, "ddg", single_process_s=9.0, **FREE)
    assert [c.k for c in choice.candidates] == [1, 2, 3] and choice.k == 3


def test_summary_names_the_choice_and_every_k() -> None:
    choice = choose_stages(uniform(8), 3, "fr", single_process_s=24.0, **FREE)
    text = choice.summary()
    lines = text.splitlines()
    # 2F+B = 4 per early block, F+B = 3 in the last: 8 | 8 | 12 is the most even of the 12 s splits.
    assert lines[0] == "fr with up to 3 workers: K=3 stages, sizes [2, 2, 4]"
    assert "single-process backprop: speed-up 2.00x" in lines[1]
    for k in (1, 2, 3):
        assert any(line.startswith(f"K={k}:") for line in lines)
    assert text.count("stage  blocks  compute ms") == 2  # a stage table for K=2 and K=3
    assert len(lines) < 20


# --- predicting K devices ----------------------------------------------------------------------


def test_predict_speedups_for_k_devices() -> None:
    predictions = predict_speedups(uniform(5), range(2, 9), "ddg", **FREE)
    assert [p.k for p in predictions] == [2, 3, 4, 5]  # blocks permitting
    assert predictions[-1].speedup == 5.0  # baseline: backprop on one such device, 5 x 3 s
    assert [p.sizes for p in predictions][:2] == [(3, 2), (2, 2, 1)]
    speedups = [p.speedup for p in predictions]
    assert speedups == sorted(speedups)
    fr = predict_speedups(uniform(5), [2], "fr", single_process_s=30.0, **FREE)
    assert fr[0].speedup == 30.0 / predict_step_seconds("fr", uniform(5), fr[0].sizes, **FREE)
    assert backprop_seconds(uniform(5)) == 15.0


# --- errors ------------------------------------------------------------------------------------


def test_bad_arguments_raise_config_error() -> None:
    costs = uniform(4)
    with pytest.raises(
        ConfigError, match=f"unknown method 'gpipe' for the cost model; use one of: {', '.join(stage_parallel_names())}$"
    ):
        predict_step_seconds("gpipe", costs, [2, 2])
    with pytest.raises(
        ConfigError, match="no stage-parallel form of method 'ulr' for the cost model; use one of: bp,"
    ):
        balanced_sizes(costs, 2, "ulr")
    with pytest.raises(ConfigError, match="sum to the 4 blocks"):
        predict_step_seconds("fr", costs, [2, 1])
    with pytest.raises(ConfigError, match="cannot split 4 blocks into 5"):
        balanced_sizes(costs, 5, "fr")
    with pytest.raises(ConfigError, match="cannot split 4 blocks into 5"):
        balanced_sizes(costs, 5, "bp")
    with pytest.raises(ConfigError, match="workers must be"):
        choose_stages(costs, 0, "fr", single_process_s=1.0)
    with pytest.raises(ConfigError, match="single_process_s"):
        choose_stages(costs, 2, "fr", single_process_s=0.0)
    with pytest.raises(ConfigError, match="bandwidth"):
        predict_step_seconds("fr", costs, [4], bandwidth_bytes_per_s=0.0)
    assert {"fr", "ddg", "dni", "bp"} <= set(stage_parallel_names())  # tests may register more


# --- method knowledge comes from the methods ---------------------------------------------------


def test_a_new_method_is_predicted_from_its_own_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered stage-parallel method needs no entry in the cost model: its class answers."""
    import gradkit.stages.cost_model as cost_model

    class Triple(PipelineMethod):
        @classmethod
        def block_seconds(cls, forward_s: float, backward_s: float, *, last: bool,
                          synthesizer_fraction: float = 0.0) -> float:
            return forward_s + backward_s if last else 3 * forward_s + backward_s

    class Locked(PipelineMethod):
        backward_locked = True

    classes = {"triple": Triple, "locked": Locked}
    monkeypatch.setattr(cost_model, "stage_parallel_names", lambda: [*classes, "fr"])
    real = stage_parallel_class
    monkeypatch.setattr(cost_model, "stage_parallel_class", lambda n: classes.get(n) or real(n))
    costs = uniform(4)  # F=1, B=2
    stages = predict_stages("triple", costs, [2, 2], **FREE)
    assert [s.compute_s for s in stages] == [10.0, 6.0]  # 2 x (3F+B) | 2 x (F+B)
    assert predict_step_seconds("triple", costs, [2, 2], **FREE) == 10.0  # slowest stage
    assert predict_step_seconds("locked", costs, [2, 2], **FREE) == 12.0  # sum of the stages
    costs = [BlockCost(1, 1, 9), BlockCost(1, 1, 1), BlockCost(1, 1, 9)]
    assert balanced_sizes(costs, 2, "locked") == [2, 1]  # fewest bytes, not the fastest stage
    assert balanced_sizes(costs, 2, "triple", **FREE) == [1, 2]


def test_the_shipped_methods_answer_as_the_paper_says() -> None:
    fr, ddg, dni, bp = (stage_parallel_class(n) for n in ("fr", "ddg", "dni", "bp"))
    assert fr is not None and ddg is not None and dni is not None and bp is not None
    assert fr.block_seconds(1.0, 2.0, last=False) == 4.0 and fr.block_seconds(1.0, 2.0, last=True) == 3.0
    assert ddg.block_seconds(1.0, 2.0, last=False) == 3.0
    assert dni.block_seconds(1.0, 2.0, last=False, synthesizer_fraction=0.5) == 4.5
    assert dni.block_seconds(1.0, 2.0, last=True, synthesizer_fraction=0.5) == 3.0
    assert [c.backward_locked for c in (fr, ddg, dni, bp)] == [False, False, False, True]
    assert stage_parallel_class("ulr") is None
