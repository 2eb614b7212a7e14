"""``--stages auto``: pick K and the split from the workers at hand and the profiled block costs.

The reviewers' first question about Features Replay was how to set K. gradkit answers it with the
cost model of :mod:`gradkit.stages.cost_model`: it profiles every block's forward and backward time
and output size on one training batch, with the threads one worker would get, and compares the
predicted step time of every K from 1 to the number of workers against plain backprop on the whole
machine. The chosen K and split are written into the run's configuration, so ``--resume`` reuses them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.errors import ConfigError
from gradkit.launch_env import launched_world_size
from gradkit.methods import stage_parallel_class, stage_parallel_names
from gradkit.models import build_model
from gradkit.stages.cost_model import AutoChoice, backprop_seconds, choose_stages
from gradkit.stages.profile import profile_blocks

__all__ = ["available_workers", "default_threads", "plan_stages", "resolve_auto_stages"]


def default_threads(local_world_size: int) -> int:
    """Torch threads per rank when ``--threads`` is not given: this machine's cores / its ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def available_workers() -> int:
    """Workers this machine offers: one per GPU, else one per core."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return default_threads(1)


def plan_stages(config: TrainConfig, workers: int) -> AutoChoice:
    """Profile ``config``'s model on one of its training batches and choose K <= ``workers``."""
    if stage_parallel_class(config.method) is None:
        raise ConfigError(f"--stages auto needs a pipelined method ({', '.join(stage_parallel_names())}), "
                          f"not {config.method!r}")
    dataset = load_dataset(config.data, config.data_dir, download=config.download,
                           limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed,
                           options=config.data_options)
    loader = BatchLoader(dataset.train_x, dataset.train_y, dataset.info, config.batch_size, train=True,
                         seed=config.seed)
    sample, _ = next(iter(loader.epoch(0)))
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.info.input_shape, dataset.info.num_classes,
                        **{**dataset.model_args, **config.model_options})
    per_worker = config.threads or default_threads(workers)
    costs = profile_blocks(model, sample, threads=per_worker)
    # The baseline is the best single-process backprop: all cores, or one thread when the model is
    # too small for threads to pay (then they only add overhead).
    cores = default_threads(1)
    whole = backprop_seconds(costs if per_worker == cores else profile_blocks(model, sample, threads=cores))
    if per_worker != 1:
        whole = min(whole, backprop_seconds(profile_blocks(model, sample, threads=1)))
    else:
        whole = min(whole, backprop_seconds(costs))
    return choose_stages(costs, workers, config.method, single_process_s=whole)


def resolve_auto_stages(config: TrainConfig, workers: int | None,
                        saved: dict[str, Any] | None) -> TrainConfig:
    """The configuration with K, the split and the workers chosen (``config.stages`` is a placeholder).

    Args:
        config: the run's options; ``stages`` is ignored.
        workers: ``--workers``, the most processes to use; None: one per GPU, else one per core.
        saved: the configuration saved with the run being resumed (the caller reads it from the run
            folder), or None. On ``--resume`` its K and split are reused instead of profiling again.
    """
    if config.resume and saved is not None:
        k, sizes = int(saved["stages"]), tuple(saved["stage_sizes"])
        return replace(config, stages=k, stage_sizes=sizes, workers=k if k > 1 else None)
    world_size = launched_world_size()
    if world_size is not None:  # torchrun fixed K: choose the split only
        return replace(config, stages=world_size, balance="time")
    choice = plan_stages(config, workers or available_workers())
    print(choice.summary())
    k = choice.k
    return replace(config, stages=k, stage_sizes=tuple(choice.sizes) if k > 1 else None,
                   workers=k if k > 1 else None)
