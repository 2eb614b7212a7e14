"""The package was ``gradkit.lr`` and its classes ``LR*``: the old names resolve for one release, with a
DeprecationWarning, and checkpoints written under the old state key still load."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import gradkit
import gradkit.likelihood_ratio as likelihood_ratio
from gradkit.methods import build


def test_gradkit_lr_attribute_warns_and_is_the_likelihood_ratio_package() -> None:
    with pytest.warns(DeprecationWarning, match=r"gradkit\.lr was renamed to gradkit\.likelihood_ratio"):
        old = gradkit.lr  # type: ignore[attr-defined]
    assert old is likelihood_ratio


def test_no_module_named_lr_is_left() -> None:
    assert importlib.util.find_spec("gradkit.lr") is None


@pytest.mark.parametrize("old, new", [
    ("LRConfig", "LikelihoodRatioConfig"),
    ("LREstimator", "LikelihoodRatioEstimator"),
    ("LRLayer", "NoisyLayer"),
])
def test_old_class_names_warn_and_return_the_renamed_class(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"{old} was renamed to {new}; the old name goes in the next release"):
        cls = getattr(likelihood_ratio, old)
    assert cls is getattr(likelihood_ratio, new)


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        likelihood_ratio.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError):
        gradkit.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_estimator_state_saved_under_the_old_key_still_loads() -> None:
    def fresh() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3)))

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    a = build("ulr", [fresh()], copies=8, sigma=0.05, adaptive_sigma=True, sigma_lr=0.1)
    torch.manual_seed(1)
    for _ in range(3):
        a.step(x, y)
    state = copy.deepcopy(a.state_dict())
    assert "estimator" in state and "lr_estimator" not in state
    state["lr_estimator"] = state.pop("estimator")  # a checkpoint written before the rename
    b = build("ulr", [fresh()], copies=8, sigma=0.05, adaptive_sigma=True, sigma_lr=0.1)
    b.load_state_dict(state)
    assert b.estimator.sigmas() == a.estimator.sigmas()  # type: ignore[union-attr]
    assert b.estimator.sigmas() != {k: 0.05 for k in b.estimator.sigmas()}  # type: ignore[union-attr]
