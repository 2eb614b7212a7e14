"""ULR estimators: unbiased on tiny models, exact local contractions, chunking does not change them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit.likelihood_ratio.engine as engine
from gradkit.errors import ConfigError
from gradkit.likelihood_ratio import (
    LikelihoodRatioConfig,
    LikelihoodRatioEstimator,
    draw_noise,
    local_grads,
)
from gradkit.likelihood_ratio.layers import _vjp


def true_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def estimates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runs: int, **options: object) -> torch.Tensor:
    """``runs`` independent estimates (different seeds) of all parameters, flattened: (runs, P)."""
    est = LikelihoodRatioEstimator([model], F.cross_entropy, LikelihoodRatioConfig(**options))
    rows = []
    for seed in range(runs):
        torch.manual_seed(seed)
        est.estimate(x, y)
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def assert_unbiased(samples: torch.Tensor, truth: torch.Tensor) -> None:
    """Each coordinate's mean is within 5 standard errors of the truth (plus 1e-4 for σ² bias and
    float32 rounding). With ~100 coordinates a correct estimator fails this with probability < 1e-4;
    an estimator off by a factor (e.g. σ vs σ²) or a transposed contraction fails it by far."""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    z = (mean - truth).abs() / (5 * se + 1e-4)
    assert z.max() < 1, f"worst coordinate off by {float(z.max()):.2f} x tolerance"
    # And not trivially: the truth is far from zero relative to the tolerance somewhere.
    assert (truth.abs() > 5 * se + 1e-4).any()


def test_linear_estimate_is_unbiased() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3)))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    truth = torch.cat([g.flatten() for g in true_grads(model, x, y)])
    samples = estimates(model, x, y, runs=300, copies=16, sigma=1e-2)
    assert_unbiased(samples, truth)


def test_conv_estimate_is_unbiased() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten()),
        nn.Sequential(nn.Linear(3 * 3 * 3, 3)),
    )
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    truth = torch.cat([g.flatten() for g in true_grads(model, x, y)])
    samples = estimates(model, x, y, runs=300, copies=16, sigma=1e-2)
    assert_unbiased(samples, truth)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2, bias=False),
    nn.Conv2d(4, 6, 1, stride=2, groups=2),
])
def test_conv_estimator_equals_conv2d_weight(conv: nn.Conv2d) -> None:
    x = torch.randn(5, 4, 9, 9)
    g = torch.randn_like(conv(x))
    got = local_grads(conv, x, g)
    expected = torch.nn.grad.conv2d_weight(
        x, conv.weight.shape, g, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups,
    )
    torch.testing.assert_close(got["weight"], expected)
    # ... and that contraction is J_Wᵀ g (autograd through this one layer).
    torch.testing.assert_close(got["weight"], _vjp(conv, x, g)["weight"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module", [nn.Linear(7, 4), nn.BatchNorm2d(3).eval(), nn.BatchNorm1d(7).eval()])
def test_closed_forms_equal_local_vjp(module: nn.Module) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        x = torch.randn(6, module.num_features, 5, 5) if isinstance(module, nn.BatchNorm2d) else torch.randn(6, 7)
    else:
        x = torch.randn(6, 3, 7)  # leading dims (e.g. time steps) contract like the batch
    g = torch.randn_like(module(x))
    got, ref = local_grads(module, x, g), _vjp(module, x, g)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_chunked_and_unchunked_copies_give_the_same_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3)))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    noise = {(10, 8): torch.randn(12, 10, 8), (10, 3): torch.randn(12, 10, 3)}
    used: dict[tuple[int, int], int] = {}

    def fixed(copies: int, batch: int, shape: tuple[int, ...], **_: object) -> torch.Tensor:
        key = (batch, *shape)
        start = used.get(key, 0)
        used[key] = start + copies
        return noise[key][start : start + copies]

    monkeypatch.setattr(engine, "draw_noise", fixed)
    grads = []
    for budget in (1e3, 1e-4):  # all 12 copies in one chunk, or one copy per chunk
        used.clear()
        config = LikelihoodRatioConfig(copies=12, memory_budget_mb=budget)
        LikelihoodRatioEstimator([model], F.cross_entropy, config).estimate(x, y)
        assert used == {(10, 8): 12, (10, 3): 12}
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_estimate_fills_grad_so_any_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 3)))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    est = LikelihoodRatioEstimator([model], F.cross_entropy, LikelihoodRatioConfig(copies=32))
    first = est.estimate(x, y)
    for _ in range(30):
        opt.step()
        last = est.estimate(x, y)
    assert last < first - 0.2


def test_noise_layouts() -> None:
    torch.manual_seed(0)
    eps = draw_noise(8, 3, (5,), antithetic=True)
    torch.testing.assert_close(eps[4:], -eps[:4])
    q = draw_noise(64, 50, (7,), sampler="qmc")
    assert q.shape == (64, 50, 7)
    # Scrambled Sobol through the inverse CDF: standard-normal marginals.
    assert abs(float(q.mean())) < 0.05 and abs(float(q.std()) - 1) < 0.05
    with pytest.raises(ConfigError, match="even"):
        draw_noise(3, 1, (2,), antithetic=True)


@pytest.mark.parametrize("options, message", [
    ({"baseline": "mean"}, "baseline='mean'"),
    ({"copies": "8,8,8"}, "has 3 values but the model has 2 layers"),
    ({"sigma": -1.0}, "must be positive"),
    ({"inject": "input"}, "inject='input'"),
])
def test_bad_options_are_one_line_config_errors(options: dict, message: str) -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3)))
    with pytest.raises(ConfigError, match=message):
        LikelihoodRatioEstimator([model], F.cross_entropy, LikelihoodRatioConfig(**options))


def test_adaptive_sigma_moves_sigma_and_resumes_exactly() -> None:
    from gradkit.methods import build

    def fresh() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3)))

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    a = build("ulr", [fresh()], copies=8, sigma=0.05, adaptive_sigma=True, sigma_lr=0.1)
    torch.manual_seed(1)
    for _ in range(3):
        a.step(x, y)
    sigmas = a.estimator.sigmas()  # type: ignore[union-attr]
    assert all(s != 0.05 for s in sigmas.values())
    assert all(0.05 / 100 <= s <= 0.05 * 10 for s in sigmas.values())
    b = build("ulr", [fresh()], copies=8, sigma=0.05, adaptive_sigma=True, sigma_lr=0.1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through a checkpoint file
    assert b.estimator.sigmas() == sigmas  # type: ignore[union-attr]
    torch.manual_seed(2)
    la = a.step(x, y)
    torch.manual_seed(2)
    assert b.step(x, y) == la
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_reusing_the_clean_output_does_not_change_the_estimate() -> None:
    """Layer-wise copies skip their layer's computation; all-at-once passes recompute it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 3)))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    est = LikelihoodRatioEstimator([model], F.cross_entropy, LikelihoodRatioConfig(copies=4))
    torch.manual_seed(3)
    est.estimate(x, y)
    reused = [p.grad.clone() for p in model.parameters()]
    # The same noise with the layer recomputed: pretend no clean output was captured.
    original = est._clean_pass

    def without_outputs(*args: object, **kwargs: object):  # noqa: ANN202
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        result.layer_outputs.clear()
        return result

    est._clean_pass = without_outputs  # type: ignore[method-assign]
    torch.manual_seed(3)
    est.estimate(x, y)
    for a, b in zip(reused, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
