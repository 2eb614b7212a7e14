"""Measured memory of FR and DDG against the FR paper's Table 1: O(L + K²) versus O(LK + K²)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit
from gradkit.memory import measure_step
from gradkit.methods import build

WIDTH, BATCH = 64, 32
BOUNDARY_BYTES = BATCH * WIDTH * 4  # one stage input or δ, float32


def deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(*blocks, nn.Sequential(nn.Linear(WIDTH, 10)))


def steady_state_memory(name: str, k: int):  # noqa: ANN201
    """The memory report of the first step at which every stage runs its full workload."""
    method = build(name, gradkit.split(deep_mlp(), k, balance="count"))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(method.steady_step + 1)]
    for x, y in data[:-1]:
        method.step(x, y)
    return measure_step(method, *data[-1])[1]


@pytest.fixture(scope="module")
def backprop_bytes() -> int:
    return steady_state_memory("bp", 1).saved_bytes


@pytest.mark.parametrize("k", [2, 3, 4])
def test_fr_memory_is_within_table_1_and_below_ddg(k: int, backprop_bytes: int) -> None:
    fr = steady_state_memory("fr", k)
    ddg = steady_state_memory("ddg", k)
    # FR: the activations of one forward pass (L) plus O(K²) stored stage inputs and δ messages.
    assert backprop_bytes <= fr.activation_bytes <= backprop_bytes + k * k * BOUNDARY_BYTES
    # Stage k stores its last K-k inputs (measured in bytes, not counted).
    fifo = [s.buffers.get("fifo", 0) for s in fr.stages]
    assert fifo == [(k - s) * BOUNDARY_BYTES for s in range(k - 1)] + [0]
    # DDG keeps K-k whole graphs per stage: more than FR for every K >= 2.
    graphs = sum(s.buffers["stashed_graphs"] for s in ddg.stages)
    assert graphs > fr.activation_bytes - backprop_bytes
    assert ddg.activation_bytes > fr.activation_bytes


def test_ddg_graph_memory_grows_with_k() -> None:
    graphs = [sum(s.buffers["stashed_graphs"] for s in steady_state_memory("ddg", k).stages) for k in (2, 3, 4)]
    assert graphs[0] < graphs[1] < graphs[2]


def test_bp_has_no_buffers_and_fr_with_one_stage_matches_it(backprop_bytes: int) -> None:
    report = steady_state_memory("fr", 1)
    assert report.buffer_bytes == 0
    assert report.activation_bytes == backprop_bytes
