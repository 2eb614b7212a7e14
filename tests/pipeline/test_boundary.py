"""The shapes stages hand each other, found by a probe that changes nothing a run would see."""

from __future__ import annotations

import torch
from torch import nn

from gradkit.pipeline.boundary import is_sequence_boundary, stage_output_shapes


def test_shapes_per_stage_and_which_are_sequences() -> None:
    stages = [nn.Embedding(10, 8), nn.Sequential(nn.Linear(8, 6), nn.Flatten()), nn.Linear(30, 3)]
    shapes = stage_output_shapes(stages, torch.zeros(4, 5, dtype=torch.long))
    assert shapes == [(5, 8), (30,), (3,)]
    assert [is_sequence_boundary(s) for s in shapes] == [True, False, False]
    assert not is_sequence_boundary((16, 8, 8))  # feature maps (C, H, W)


def test_the_probe_leaves_running_statistics_and_random_streams_alone() -> None:
    stages = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)), nn.Linear(4, 2)]
    for stage in stages:
        stage.train()
    bn = stages[0][1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    sample = torch.randn(8, 4) + 3.0
    rng = torch.get_rng_state()
    stage_output_shapes(stages, sample)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing a run would later draw
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
