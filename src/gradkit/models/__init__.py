"""Models as ``nn.Sequential`` stacks of named blocks, looked up by name.

Every model maps ``(N, *input_shape)`` to ``(N, num_classes)`` logits and is an ``nn.Sequential`` of
blocks ("stem", "stage1_block1", ..., "head"), so :func:`gradkit.stages.split` can cut it into pipeline
stages. Nothing is downloaded; weights are freshly initialised.

Example:
    >>> from gradkit.models import MODELS, build_model
    >>> model = build_model("resnet20", (3, 32, 32), 10)
    >>> "resnet20" in MODELS
    True
"""

from __future__ import annotations

# Importing the builder modules registers their models.
from gradkit.models import cnn, gcn, gpt, mlp, recurrent, resnet, small, spiking  # noqa: F401
from gradkit.models._registry import MODELS, ModelBuilder, build_model, model_label

__all__ = ["MODELS", "ModelBuilder", "build_model", "model_label"]
