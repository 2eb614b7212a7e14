"""``--stages auto``: pick K and the split from the workers at hand and the profiled block costs.

The reviewers' first question about Features Replay was how to set K. gradkit answers it with the
cost model of :mod:`gradkit.distributed.cost_model`: it profiles every block's forward and backward
time and output size on one training batch, with the threads one worker would get, and compares the
predicted step time of every K from 1 to the number of workers against plain backprop on the whole
machine. The chosen K and split are written into the run's configuration, so ``--resume`` reuses them.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.distributed import in_worker_process
from gradkit.distributed.cost_model import (
    AutoChoice,
    backprop_seconds,
    choose_stages,
    profile_block_costs,
)
from gradkit.distributed.run import PIPELINED_METHODS, default_threads
from gradkit.errors import ConfigError
from gradkit.models import build_model

__all__ = ["available_workers", "plan_stages", "resolve_auto_stages"]

def available_workers() -> int:
    """Workers this machine offers: one per GPU, else one per core."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return default_threads(1)


def plan_stages(config: TrainConfig, workers: int) -> AutoChoice:
    """Profile ``config``'s model on one of its training batches and choose K <= ``workers``."""
    if config.method not in PIPELINED_METHODS:
        raise ConfigError(f"--stages auto needs a pipelined method ({', '.join(PIPELINED_METHODS)}), "
                          f"not {config.method!r}")
    dataset = load_dataset(config.data, config.data_dir, download=config.download,
                           limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed)
    loader = BatchLoader(dataset.train_x, dataset.train_y, dataset.info, config.batch_size, train=True,
                         seed=config.seed)
    sample, _ = next(iter(loader.epoch(0)))
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.info.input_shape, dataset.info.num_classes, **dataset.model_args)
    per_worker = config.threads or default_threads(workers)
    costs = profile_block_costs(model, sample, threads=per_worker)
    # The baseline is the best single-process backprop: all cores, or one thread when the model is
    # too small for threads to pay (then they only add overhead).
    cores = default_threads(1)
    whole = backprop_seconds(costs if per_worker == cores else profile_block_costs(model, sample, threads=cores))
    if per_worker != 1:
        whole = min(whole, backprop_seconds(profile_block_costs(model, sample, threads=1)))
    else:
        whole = min(whole, backprop_seconds(costs))
    return choose_stages(costs, workers, config.method, single_process_s=whole)


def resolve_auto_stages(config: TrainConfig, workers: int | None) -> TrainConfig:
    """The configuration with K, the split and the workers chosen (``config.stages`` is a placeholder).

    On ``--resume`` the choice saved with the run is reused instead of profiling again.
    """
    if config.resume and config.out_path is not None and (config.out_path / "config.json").is_file():
        saved = json.loads((config.out_path / "config.json").read_text())
        k, sizes = int(saved["stages"]), tuple(saved["stage_sizes"])
        return replace(config, stages=k, stage_sizes=sizes, workers=k if k > 1 else None)
    if in_worker_process():  # torchrun fixed K: choose the split only
        k = int(os.environ["WORLD_SIZE"])
        return replace(config, stages=k, balance="time")
    choice = plan_stages(config, workers or available_workers())
    print(choice.summary())
    k = choice.k
    return replace(config, stages=k, stage_sizes=tuple(choice.sizes) if k > 1 else None,
                   workers=k if k > 1 else None)
