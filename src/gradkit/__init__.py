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

from typing import TYPE_CHECKING, Any

from gradkit import data, memory, methods, models
from gradkit.config import TrainConfig
from gradkit.errors import ConfigError, DataError, GradkitError, TrainingDiverged
from gradkit.models import build_model
from gradkit.stages import split

if TYPE_CHECKING:
    from gradkit.loop import RunInterrupted, RunResult, evaluate, train

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

_FROM_LOOP = ("RunInterrupted", "RunResult", "evaluate", "train")


def __getattr__(name: str) -> Any:
    # The training loop (and through it the distributed runner) loads on first use, so that importing
    # a part of gradkit (gradkit.stages, gradkit.methods, ...) does not import the runner.
    if name in _FROM_LOOP:
        from gradkit import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'gradkit' has no attribute {name!r}")
