"""Training methods, by name: ``gradkit.methods.build("bp", stages, ...)``."""

from gradkit.methods._base import LossFn, Method
from gradkit.methods._pipelined import PipelineMethod
from gradkit.methods._registry import (
    METHODS,
    build,
    check_options,
    method_options,
    stage_parallel_class,
    stage_parallel_names,
)
from gradkit.methods.backprop import Backprop
from gradkit.methods.delayed_gradients import DelayedGradients
from gradkit.methods.features_replay import FeaturesReplay
from gradkit.methods.forward_gradient import ForwardGradient
from gradkit.methods.likelihood_ratio import LikelihoodRatio
from gradkit.methods.perturbation import SPSA, EvolutionStrategies
from gradkit.methods.synthetic_gradients import SyntheticGradients

__all__ = [
    "METHODS",
    "Backprop",
    "SPSA",
    "DelayedGradients",
    "EvolutionStrategies",
    "FeaturesReplay",
    "ForwardGradient",
    "LikelihoodRatio",
    "LossFn",
    "Method",
    "PipelineMethod",
    "SyntheticGradients",
    "check_options",
    "build",
    "method_options",
    "stage_parallel_class",
    "stage_parallel_names",
]
