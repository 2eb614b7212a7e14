"""gradkit: train PyTorch models faster and in less memory than plain backpropagation.

Methods: Features Replay and its baselines (Huo et al., NeurIPS 2018), approximate activations
(Chakrabarti & Moseley, NeurIPS 2019) and likelihood-ratio gradients (Jiang et al., ICLR 2024), each
tested against plain backprop (``bp``).

Example:
    >>> import gradkit
    >>> stages = gradkit.split(model, 2, balance="params")
    >>> method = gradkit.methods.build("bp", stages)
    >>> loss = method.step(x, y)
"""

import importlib
import warnings
from typing import Any

from gradkit import data, memory, methods, models
from gradkit.backend import evaluate
from gradkit.config import TrainConfig
from gradkit.errors import ConfigError, DataError, GradkitError, RunInterrupted, TrainingDiverged
from gradkit.loop import RunResult
from gradkit.models import build_model
from gradkit.stages import split
from gradkit.training import train

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "GradkitError",
    "RunInterrupted",
    "RunResult",
    "TrainConfig",
    "TrainingDiverged",
    "__version__",
    "build_model",
    "data",
    "evaluate",
    "memory",
    "methods",
    "models",
    "split",
    "train",
]


def __getattr__(name: str) -> Any:
    # gradkit.lr was renamed gradkit.likelihood_ratio ("lr" means learning rate everywhere else);
    # the old attribute still resolves, with a warning, until the next release.
    if name == "lr":
        warnings.warn(
            "gradkit.lr was renamed to gradkit.likelihood_ratio; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("gradkit.likelihood_ratio")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
