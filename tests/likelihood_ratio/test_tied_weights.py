"""``ulr`` on a tied weight (issue 14, item 2): every use is estimated and the estimates add up.

A tiny language model whose output head reuses the embedding's weight. The true gradient of that weight
is the sum of two parts (the embedding's use and the head's); each part alone has a cosine of about 0.76
and 0.85 with the total here. The mean of N estimates must point at the total: cosine above 0.97 and
relative error below 0.2 (the estimator's noise averaged over N * copies draws leaves about 0.05 at
these sizes), which an estimate of one use only cannot reach.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy
from gradkit.methods import build
from gradkit.optim import OptimizerConfig
from gradkit.stages import split

V, C = 8, 6


class TiedHead(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.proj = nn.Linear(C, V, bias=False)
        self.proj.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def tied_model() -> nn.Sequential:
    torch.manual_seed(0)
    embedding = nn.Embedding(V, C)
    return nn.Sequential(embedding, nn.Sequential(nn.Linear(C, C), nn.Tanh()), TiedHead(embedding))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("stages", [1, 2], ids=["per-layer", "hybrid"])
def test_the_estimate_of_a_tied_weight_is_unbiased_for_its_total_gradient(stages: int) -> None:
    model = tied_model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, V, (16, 5), generator=g), torch.randint(0, V, (16, 5), generator=g)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters(remove_duplicate=False)}
    loss = cross_entropy(functional_call(model, params, (x,), tie_weights=False), y)
    embedding_use, head_use = torch.autograd.grad(loss, [params["0.weight"], params["2.proj.weight"]])
    total = embedding_use + head_use
    one_use = max(_cos(embedding_use, total), _cos(head_use, total))
    assert one_use < 0.9  # both uses matter in this model

    parts = [model] if stages == 1 else split(model, sizes=[2, 1])
    method = build("ulr", parts, optimizer=OptimizerConfig(lr=0.0).factory(), copies=64, sigma=0.05)
    torch.manual_seed(0)
    n = 30
    mean = torch.zeros_like(total)
    for _ in range(n):
        method.estimate(x, y)  # type: ignore[attr-defined]
        mean += model[0].weight.grad / n
    assert _cos(mean, total) > max(0.97, one_use + 0.1)
    assert float((mean - total).norm() / total.norm()) < 0.2


def test_a_module_used_twice_is_refused_by_the_per_layer_estimator() -> None:
    block = nn.Linear(4, 4)
    model = nn.Sequential(block, nn.Tanh(), block, nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"2 is the same module as 0 \(used twice\); use the hybrid mode"):
        build("ulr", [model])
    build("ulr", split(model, sizes=[2, 2]))  # the hybrid mode backpropagates inside its stages
