"""Likelihood-ratio gradient estimation: training from forward passes with noise, no backward pass.

Jiang, Zhang, Xu, Yu, Peng, "One Forward is Enough for Neural Network Training via Likelihood Ratio
Method" (ICLR 2024). :class:`LikelihoodRatioEstimator` fills ``.grad`` with the estimate so any torch
optimizer applies it; :func:`hybrid_estimate` puts noise only at stage boundaries and backpropagates
inside stages. The ``ulr`` method (``gradkit.methods``) wraps both.

This package was ``gradkit.lr`` (and its classes ``LRConfig``, ``LREstimator``, ``LRLayer``); the old
names still resolve, with a DeprecationWarning, until the next release.
"""

import warnings
from typing import Any

from gradkit.likelihood_ratio.engine import (
    BASELINES,
    INJECTIONS,
    LikelihoodRatioConfig,
    LikelihoodRatioEstimator,
    per_sample_loss,
)
from gradkit.likelihood_ratio.layers import NoisyLayer, StepNoiseLayer, find_layers, local_grads
from gradkit.likelihood_ratio.noise import SAMPLERS, draw_noise

__all__ = [
    "BASELINES",
    "INJECTIONS",
    "SAMPLERS",
    "LikelihoodRatioConfig",
    "LikelihoodRatioEstimator",
    "NoisyLayer",
    "StepNoiseLayer",
    "draw_noise",
    "find_layers",
    "local_grads",
    "per_sample_loss",
]

# Deprecated names (renamed when the package was gradkit.lr); removed in the next release.
_RENAMED = {
    "LRConfig": "LikelihoodRatioConfig",
    "LREstimator": "LikelihoodRatioEstimator",
    "LRLayer": "NoisyLayer",
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"gradkit.likelihood_ratio.{name} was renamed to {new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
