"""What stages hand each other: the shape of every stage's output, and whether it is a sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradkit.pipeline.batchnorm import frozen_running_stats

__all__ = ["is_sequence_boundary", "stage_output_shapes"]


def is_sequence_boundary(shape: Sequence[int]) -> bool:
    """Whether a stage output of per-example ``shape`` is a sequence ``(T, C)``: a language model's
    ``(N, T, C)`` between two blocks (feature maps are ``(C, H, W)``, vectors ``(F,)``)."""
    return len(shape) == 2


@torch.no_grad()
def stage_output_shapes(stages: Sequence[nn.Module], sample: torch.Tensor) -> list[tuple[int, ...]]:
    """The per-example shape of each stage's output, from one forward of ``sample`` through all of
    them (no graph; BatchNorm running statistics and the random streams, which dropout draws from,
    left as they were: the probe changes nothing a run would see)."""
    shapes = []
    h = sample
    devices = [sample.device.index or 0] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), frozen_running_stats(nn.ModuleList(stages)):
        for stage in stages:
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes
