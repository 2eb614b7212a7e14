"""The forward-only peers of ULR: forward gradients, SPSA and ES point along the true gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods import build


def tiny() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3)))
    return model, torch.randn(32, 6), torch.randint(0, 3, (32,))


@pytest.mark.parametrize("name, options, expected", [
    ("forward-grad", {"directions": 1000}, 0.85),  # (∇L·v)v is unbiased: many directions converge
    ("spsa", {"directions": 1000, "sigma": 1e-3}, 0.9),
    ("es", {"directions": 1000}, 0.8),  # rank-shaped: a monotone transform of the loss, not unbiased
])
def test_peer_estimates_point_along_the_gradient(name: str, options: dict, expected: float) -> None:
    model, x, y = tiny()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    truth = torch.cat([p.grad.flatten() for p in model.parameters()])
    method = build(name, [model], **options)
    torch.manual_seed(1)
    method.estimate(x, y)  # type: ignore[attr-defined]
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(F.cosine_similarity(got, truth, dim=0)) > expected
    if name != "es":  # unbiased estimators also get the scale right
        assert 0.7 < float(got.norm() / truth.norm()) < 1.5


@pytest.mark.parametrize("name", ["forward-grad", "spsa", "es"])
def test_peers_train_and_reject_bad_options(name: str) -> None:
    model, x, y = tiny()
    method = build(name, [model], directions=8)
    first = method.step(x, y)
    for _ in range(40):
        last = method.step(x, y)
    assert last < first
    with pytest.raises(ConfigError, match="directions"):
        build(name, [model], directions=0)
