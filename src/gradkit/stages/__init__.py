"""Splitting a model into pipeline stages and balancing them, in one package.

- :mod:`~gradkit.stages.split`: :func:`split` (stages that share the model's blocks), :data:`BALANCES`,
  :func:`choose_sizes` (the split a training run uses) and :func:`check_stage_sizes`,
  :func:`shared_parameters` (from :mod:`gradkit.pipeline.shared`), the parameters several stages hold;
- :mod:`~gradkit.stages.partition`: the exact partition of block costs into contiguous groups;
- :mod:`~gradkit.stages.profile`: :func:`profile_blocks`, each block's forward and backward seconds
  and output bytes (:class:`BlockCost`);
- :mod:`~gradkit.stages.cost_model`: a stage-parallel method's predicted step time, its balanced
  split, and the best number of stages;
- :mod:`~gradkit.stages.auto`: ``--stages auto`` and the default threads per worker process.

Nothing here imports :mod:`gradkit.distributed`; the distributed runner builds on this package.

Example:
    >>> stages = split(model, 2, balance="time", sample=x, method="fr")
    >>> [len(s) for s in stages]
"""

from gradkit.stages.auto import available_workers, default_threads, plan_stages, resolve_auto_stages
from gradkit.stages.cost_model import (
    AutoChoice,
    SplitPrediction,
    StagePrediction,
    balanced_sizes,
    choose_stages,
    predict_speedups,
    predict_step_seconds,
)
from gradkit.stages.partition import fewest_bytes_partition, partition
from gradkit.stages.profile import BlockCost, profile_blocks
from gradkit.stages.split import (
    BALANCES,
    SharedParameter,
    check_stage_sizes,
    choose_sizes,
    shared_parameters,
    split,
)

__all__ = [
    "BALANCES",
    "AutoChoice",
    "BlockCost",
    "SharedParameter",
    "SplitPrediction",
    "StagePrediction",
    "available_workers",
    "balanced_sizes",
    "check_stage_sizes",
    "choose_sizes",
    "choose_stages",
    "default_threads",
    "fewest_bytes_partition",
    "partition",
    "plan_stages",
    "predict_speedups",
    "predict_step_seconds",
    "profile_blocks",
    "resolve_auto_stages",
    "shared_parameters",
    "split",
]
