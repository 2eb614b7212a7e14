"""Every method and every ``--activations`` mode on a tiny ``gpt`` (issue 14, item 3): a few steps each
give finite losses, move the weights of every block (so every stage trains, also the ones fed by
synthetic or estimated gradients), and, where the gradient is exact, lower the loss."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gradkit.compress import MODES, Activations, measure_activations
from gradkit.methods import build
from gradkit.models import build_model
from gradkit.optim import OptimizerConfig
from gradkit.stages import split

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is far faster

VOCAB, CONTEXT = 12, 8
EXACT = {"bp", "fr", "ddg"}  # exact (possibly delayed) gradients: the loss must fall in a few steps
STEPS = 8  # for EXACT and dni (whose lower stage moves once its synthesizer has fitted a true δ)
ESTIMATOR_STEPS = 2  # forward-only estimators only need to move every weight


def _tiny() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return build_model("gpt", (CONTEXT,), VOCAB, layers=2, width=16, heads=2)


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences (each next token is the token plus one): learnable from the current token."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(CONTEXT)) % VOCAB
    return x, (x + 1) % VOCAB


def _adam() -> Any:
    return OptimizerConfig(name="adam", lr=1e-2, weight_decay=0.0).factory()


def _moved_blocks(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}


@pytest.mark.parametrize(
    ("name", "stages", "options"),
    [
        ("bp", 1, {}), ("bp", 2, {}), ("fr", 2, {}), ("ddg", 2, {}),
        # The paper's rule (every synthetic δ applied): the default guard would keep the lower stage still.
        ("dni", 2, {"min_cosine": -1.0}), ("dni", 2, {"conditioned": True, "min_cosine": -1.0}),
        ("ulr", 1, {"copies": 4}), ("ulr", 2, {"copies": 4}),
        ("es", 1, {}), ("spsa", 1, {}), ("forward-grad", 1, {}),
    ],
)
def test_every_method_trains_every_block(name: str, stages: int, options: dict[str, Any]) -> None:
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parts = split(model, stages, balance="count") if stages > 1 else [model]
    method = build(name, parts, optimizer=_adam(), **options)
    x, y = _batch()
    losses = [method.step(x, y) for _ in range(STEPS if name in EXACT | {"dni"} else ESTIMATOR_STEPS)]
    method.flush()
    assert all(math.isfinite(v) for v in losses), losses
    assert _moved_blocks(model, before) == set(model._modules)
    if name in EXACT:
        assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("mode", list(MODES))
def test_every_activation_mode_trains(mode: str) -> None:
    model = _tiny()
    x, y = _batch()
    if mode != "exact":  # the mode really compresses something of this model
        memory = measure_activations(model, x, y, mode)
        assert memory.stored_bytes < memory.exact_bytes
    method = build("bp", [model], optimizer=_adam())
    act = Activations(model, mode)
    step = act.wrap(method.step)
    losses = [step(x, y) for _ in range(STEPS)]
    act.close()
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses
