"""Adding a pipelined method takes one file and one registry line (``toy_method.py`` beside this test)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from toy_method import Probe

import gradkit
from gradkit.methods import METHODS, stage_parallel_class
from gradkit.stages.cost_model import BlockCost, predict_stages


def _config(out: Path, **changes: object) -> gradkit.TrainConfig:
    base = gradkit.TrainConfig(method="toy-probe", stages=2, model="mlp", data="digits", limit_train=512,
                               limit_test=128, batch_size=64, epochs=2, threads=1, progress=False,
                               out=str(out))
    return replace(base, **changes)


def test_the_toy_method_is_known_everywhere_from_its_own_file() -> None:
    assert METHODS.get("toy-probe") is Probe and stage_parallel_class("toy-probe") is Probe
    # The balancer reads the method's own cost: the frozen stage only forwards.
    costs = [BlockCost(1.0, 2.0, 8), BlockCost(1.0, 2.0, 8)]
    first, last = predict_stages("toy-probe", costs, [1, 1], bandwidth_bytes_per_s=float("inf"), latency_s=0.0)
    assert (first.compute_s, last.compute_s) == (1.0, 3.0)


def test_the_toy_method_trains_with_two_workers_as_in_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = gradkit.build_model("mlp", (1, 8, 8), 10).state_dict()
    single = gradkit.train(_config(tmp_path / "one"))
    multi = gradkit.train(_config(tmp_path / "two", workers=2))
    assert [r["train_loss"] for r in multi.history] == [r["train_loss"] for r in single.history]
    assert single.history[-1]["train_loss"] < single.history[0]["train_loss"]
    assert single.history[-1]["test_acc"] > 0.3  # the head alone learns (chance: 0.1)
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    first_stage = [k for k in one if k.startswith(next(iter(one)).split(".")[0])]
    assert all(torch.equal(one[k], initial[k]) for k in first_stage), "the frozen stage moved"
    assert not all(torch.equal(one[k], initial[k]) for k in one), "nothing was trained"
