"""Likelihood-ratio gradient estimation: training from forward passes with noise, no backward pass.

Jiang, Zhang, Xu, Yu, Peng, "One Forward is Enough for Neural Network Training via Likelihood Ratio
Method" (ICLR 2024). :class:`LREstimator` fills ``.grad`` with the estimate so any torch optimizer
applies it; :func:`hybrid_estimate` puts noise only at stage boundaries and backpropagates inside
stages. The ``ulr`` method (``gradkit.methods``) wraps both.
"""

from gradkit.lr.engine import BASELINES, INJECTIONS, LRConfig, LREstimator, per_sample_loss
from gradkit.lr.layers import LRLayer, StepNoiseLayer, find_layers, local_grads
from gradkit.lr.noise import SAMPLERS, draw_noise

__all__ = [
    "BASELINES",
    "INJECTIONS",
    "SAMPLERS",
    "LRConfig",
    "LREstimator",
    "LRLayer",
    "StepNoiseLayer",
    "draw_noise",
    "find_layers",
    "local_grads",
    "per_sample_loss",
]
