"""DNI's synthesizer at a sequence boundary ``(N, T, C)`` (issue 14, item 3): one MLP over ``C`` applied at
every position, so its size does not depend on ``T``; cDNI conditions each position on its own label."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit
from gradkit.losses import cross_entropy
from gradkit.methods import build
from gradkit.methods.synthetic_gradients import Synthesizer
from gradkit.models import build_model
from gradkit.optim import OptimizerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sequence_synthesizer_size_does_not_grow_with_length() -> None:
    short, long = Synthesizer((8, 16)), Synthesizer((512, 16))
    assert _count(short) == _count(long) == (16 * 16 + 16) * 2  # Linear(C, C), ReLU, Linear(C, C)
    conditioned = Synthesizer((512, 16), num_classes=5)
    assert _count(conditioned) == _count(short) + 5 * 16
    assert _count(Synthesizer((16,))) == (16 * 64 + 64) + (64 * 16 + 16)  # vectors: as before


@pytest.mark.parametrize("labels", ["per position", "per sequence"])
def test_each_position_sees_only_itself_and_its_label(labels: str) -> None:
    torch.manual_seed(0)
    synth = Synthesizer((6, 4), num_classes=3)
    nn.init.normal_(synth.net[-1].weight)  # past the zero start
    h = torch.randn(2, 6, 4)
    y = torch.randint(0, 3, (2, 6)) if labels == "per position" else torch.randint(0, 3, (2,))
    out = synth(h, y)
    assert out.shape == h.shape
    moved = h.clone()
    moved[1, 3] += 1.0
    changed = (synth(moved, y) - out).abs().sum(-1) > 0
    assert changed.nonzero().tolist() == [[1, 3]]
    if labels == "per position":
        relabelled = y.clone()
        relabelled[0, 2] = (relabelled[0, 2] + 1) % 3
        changed = (synth(h, relabelled) - out).abs().sum(-1) > 0
        assert changed.nonzero().tolist() == [[0, 2]]


def test_cdni_synthesizer_learns_a_language_models_gradient() -> None:
    """On a tiny gpt, fitting on the true δ (warm-up; the model held still so that the target does not
    move) makes the per-position, per-token-conditioned synthetic δ point along it."""
    torch.manual_seed(0)
    model = build_model("gpt", (8,), 12, layers=2, width=16, heads=2)
    method = build("dni", gradkit.split(model, 2, balance="count"), conditioned=True, warmup_steps=10_000,
                   optimizer=OptimizerConfig(name="adam", lr=0.0, weight_decay=0.0).factory(), synthesizer_lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 12, (32, 1), generator=g) + torch.arange(8)) % 12
    y = (x + 1) % 12
    for _ in range(50):
        method.step(x, y)
    method.flush()
    synthesizer = method.pipeline_stages[0].synthesizer  # type: ignore[attr-defined]
    out = method.stages[0](x)
    (true_delta,) = torch.autograd.grad(cross_entropy(method.stages[1](out), y), out)
    with torch.no_grad():
        predicted = synthesizer(out.detach(), y) / synthesizer.terms(out)
    cosine = nn.functional.cosine_similarity(predicted.flatten(), true_delta.flatten(), dim=0).item()
    assert cosine > 0.8
