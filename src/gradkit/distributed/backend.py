"""One rank of a multi-process stage pipeline (one process per stage): the loop's backend there.

Every rank runs the same epochs and steps as one process would (the one loop,
:class:`gradkit.loop.Trainer`), but only its own stage's column of the schedule
(:class:`~gradkit.distributed.executor.DistributedExecutor`):

* rank 0 loads the data, augments each batch and feeds stage 0; labels go to the stages that need
  them (the last one, and every DNI stage) as messages, so no other rank loads images;
* the last rank computes the loss: it keeps the epoch's loss tally, shows the progress bar and notices
  divergence;
* at the end of each epoch, the stages' current weights are gathered on rank 0, which evaluates the
  model outside the pipeline (in-flight batches stay in flight, as in one process) and writes
  ``metrics.jsonl``;
* checkpoints are sharded (:class:`gradkit.run_folder.RunFolder`): each rank saves its stage,
  optimizer, buffers and received messages; rank 0 then commits a manifest.

Ctrl-C (SIGINT, or SIGTERM from torchrun) on any rank asks rank 0 to stop; rank 0 names the step
after which every rank stops, so the checkpoint they write is consistent.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gradkit.backend import (
    Backend,
    Batch,
    Progress,
    apply_resume_changes,
    build_run_model,
    check_model_reads,
    check_resume,
    evaluate,
    split_sizes,
)
from gradkit.compress import Activations
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.distributed.context import AGENT_STORE_ENV, DistContext, join
from gradkit.distributed.executor import DistributedExecutor, shared_parameter_groups
from gradkit.errors import ConfigError, GradkitError, PeerFailed, PipelineError, RunInterrupted
from gradkit.loop import RunResult, StepCallback, Trainer
from gradkit.memory import measure_step
from gradkit.methods import PipelineMethod, build, stage_parallel_class, stage_parallel_names
from gradkit.pipeline.shared import shared_buffers
from gradkit.precision import Precision
from gradkit.run_folder import RunFolder
from gradkit.stages import default_threads, split
from gradkit.tally import EpochTally

__all__ = ["StageProcessBackend", "check_stage_parallel_config", "train_rank"]

log = logging.getLogger(__name__)

_STOP_REQUESTED = "gradkit/stop_requested"
_STOP_AT = "gradkit/stop_at"


def check_stage_parallel_config(config: TrainConfig, world_size: int) -> None:
    """Options that cannot work with one process per stage, as one-line errors."""
    if stage_parallel_class(config.method) is None:
        raise ConfigError(
            f"--workers runs one process per stage, which needs a pipelined method; "
            f"{config.method!r} is not one of: {', '.join(stage_parallel_names())}"
        )
    if config.stages != world_size:
        raise ConfigError(
            f"--stages {config.stages} with {world_size} workers: each worker runs one stage, "
            f"so use --stages {world_size} (or --stages auto)"
        )
    if config.measure_direction is not None:
        raise ConfigError("--measure-direction needs the whole model in one process; drop it or --workers")
    if config.out is None:
        raise ConfigError("a multi-process run needs --out, where every rank writes its checkpoint shard")


def _check_no_shared_buffers(stages: list[torch.nn.Sequential]) -> None:
    """A buffer held by two stages (a shared block's BatchNorm statistics) would drift apart between
    their processes: only parameters are kept in step (:mod:`gradkit.pipeline.shared`)."""
    for name, ranks in shared_buffers(stages):
        raise ConfigError(
            f"buffer {name} is used by stages {', '.join(map(str, ranks))}, whose processes would update "
            "their own copies; with --workers keep a block with buffers (e.g. BatchNorm) within one stage, "
            "or train in one process"
        )


def _check_shared_copies(method: PipelineMethod, gathered: list[dict[str, torch.Tensor]]) -> None:
    """Every rank's copy of a shared parameter must be bit for bit the same (they apply the same summed
    gradient with the same optimizer state); a difference is a bug, caught here at each evaluation."""
    for s in method.shared.shared:
        copies = [gathered[k][name] for k, name in zip(s.stages, s.names, strict=True)]
        if any(not torch.equal(copies[0], c) for c in copies[1:]):
            raise PipelineError(f"the copies of the parameter {s.names[0]} shared by stages {s.stages} "
                                "differ between ranks")


class StageProcessBackend(Backend):
    """This process runs stage ``ctx.rank`` of a K-process pipeline.

    Args:
        config: the run (the same on every rank).
        ctx: this rank's process groups, store and device (:func:`gradkit.distributed.context.join`).
    """

    multi_process = True

    def __init__(self, config: TrainConfig, ctx: DistContext) -> None:
        check_stage_parallel_config(config, ctx.world_size)
        self.config, self.ctx = config, ctx
        self.rank = ctx.rank
        assert config.out is not None
        self.folder: RunFolder = RunFolder(config.out)
        self.reports = ctx.is_first
        self.holds_loss = ctx.is_last
        self.label = f"{config.method} x{ctx.world_size}"
        torch.set_num_threads(config.threads or default_threads(ctx.local_world_size))

        # Rank 0 reads the manifest and the data; every rank gets what it needs to build the model.
        setup: dict[str, Any] = {}
        self.train_loader: BatchLoader | None = None
        self.test_loader: BatchLoader | None = None
        if ctx.is_first:
            setup = self._load_on_rank_zero()
        setup = self._broadcast(setup)
        self.num_train = setup["num_train"]
        self.steps_per_epoch = math.ceil(self.num_train / config.batch_size)

        self.model = build_run_model(config, setup["info"], setup["model_args"], ctx.device)
        sample = setup["sample"].to(ctx.device)
        check_model_reads(self.model, sample, config)
        self.task = setup["info"].task
        self.stage_sizes = setup["stage_sizes"] or self._choose_split(setup["sample"])
        stages = split(self.model, sizes=self.stage_sizes)
        _check_no_shared_buffers(stages)
        method = build(config.method, stages, optimizer=config.optimizer_config().factory(),
                       stage_parallel=True, **config.method_options)
        assert isinstance(method, PipelineMethod)
        self.method: PipelineMethod = method
        self.activations = Activations(self.model, config.activations, group_size=config.activation_group_size,
                                       attention_bits=config.attention_bits)
        self.method.prepare(sample)
        self.shared_memory = ctx.shared_memory()
        self.executor = DistributedExecutor(self.method.schedule, self.method.pipeline_stages[self.rank],
                                            ctx.groups, ctx.device, shared_memory=self.shared_memory,
                                            local_peers=ctx.local_peers,
                                            shared_groups=shared_parameter_groups(self.method.shared.shared))
        self.method.use_executor(self.executor)
        self.precision = Precision(config.precision, ctx.device)
        self._step = self.precision.wrap(self.activations.wrap(self.method.run_step))

        self.progress = Progress()
        self._good_manifest: dict[str, Any] | None = None
        """Rank 0: the manifest of the last verified checkpoint (kept as the fallback by the next one)."""
        self._good_step: int | None = None
        """Every rank: the step of that checkpoint, whose shards the next checkpoint keeps."""
        self._memory_step = self.memory_step()
        self.held_stage_memory: dict[str, int] | None = None
        """What this rank's stage held at the memory step (measured here; gathered in record_extras)."""
        self._stop_posted = False
        self._stop_at: int | None = None
        """The global step after which every rank stops (agreed through the store after Ctrl-C)."""
        if setup["resume"] is not None:
            self._restore(setup["resume"])

    # -- set-up -----------------------------------------------------------------------------------
    def _load_on_rank_zero(self) -> dict[str, Any]:
        config = self.config
        resume = None
        if config.resume:
            manifest = self.folder.read_manifest()
            check_resume(config, manifest["config"], self.folder)
            if manifest["world_size"] != self.ctx.world_size:
                raise ConfigError(f"{self.folder} was written by {manifest['world_size']} workers; resume with as many")
            resume = manifest
        else:
            self.folder.check_new_run()
        dataset = load_dataset(config.data, config.data_dir, download=config.download,
                               limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed,
                               options=config.data_options)
        info = dataset.info
        self.train_loader = BatchLoader(dataset.train_x, dataset.train_y, info, config.batch_size,
                                        train=True, seed=config.seed, device=self.ctx.device)
        self.test_loader = BatchLoader(dataset.test_x, dataset.test_y, info, config.eval_batch_size,
                                       train=False, seed=config.seed, device=self.ctx.device)
        first, _ = next(iter(self.train_loader.epoch(0)))  # a sample for shapes and time balancing
        return {
            "num_train": len(dataset.train_y),
            "info": info,
            "model_args": dataset.model_args,
            "sample": first.cpu(),
            "stage_sizes": resume["stage_sizes"] if resume else None,
            "resume": resume,
        }

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctx.control)
        return box[0]

    def _choose_split(self, sample: torch.Tensor) -> list[int]:
        sizes = None
        if self.ctx.is_first:
            # Only rank 0 decides (time balancing is measured, so ranks could disagree).
            sizes = split_sizes(self.config, self.model, sample.to(self.ctx.device), stage_parallel=True)
        return list(self._broadcast(sizes))

    def _restore(self, manifest: dict[str, Any]) -> None:
        shard = self.folder.load_shard(manifest, self.rank)
        self.method.load_shard_state(self.rank, shard["method_state"])
        torch.set_rng_state(shard["rng"])
        self.held_stage_memory = shard.get("stage_memory")  # absent from shards written before it was kept
        self.progress = Progress(manifest["epoch"], manifest["step_in_epoch"], manifest["global_step"],
                                 EpochTally(**shard["tally"]) if shard.get("tally") else EpochTally(),
                                 list(manifest["history"]), dict(manifest.get("changes") or {}))
        self.resume_changes = apply_resume_changes(self.config, manifest["config"], self.method)
        self.progress.add_changes(self.resume_changes)
        self._good_step = int(manifest["global_step"])
        if self.ctx.is_first:
            self._good_manifest = manifest
            self.folder.rewrite_metrics(self.progress.history)

    # -- the loop's questions ---------------------------------------------------------------------------
    def config_record(self) -> dict[str, Any]:
        return {**super().config_record(), "workers": self.ctx.world_size}

    def batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        source = (self.train_loader.epoch(epoch, start_step=start_step)
                  if self.train_loader is not None else None)
        for step in range(start_step, self.steps_per_epoch):
            x, y = next(source) if source is not None else (None, None)
            # Every rank knows the batch size: the last, smaller batch is sent as it is.
            yield x, y, min(self.config.batch_size, self.num_train - step * self.config.batch_size)

    def train_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
        if self.progress.global_step == self._memory_step:
            # Each rank measures the stage it holds: its saved activations, FIFO or stashes, and the
            # messages sent to it before and during the step (received at once, so they are counted
            # where one process counts them). No collective here: the figures travel with the epoch
            # record (record_extras).
            def step_then_receive(x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
                loss = self._step(x, y)
                self.executor.drain()
                return loss

            self.executor.drain()
            loss, report = measure_step(self.method, x, y, step=step_then_receive)
            self.held_stage_memory = report.stages[self.rank].to_dict()
            return loss
        return self._step(x, y)

    def stop_agreed(self, stop: threading.Event) -> bool:
        """Agree on a stop: rank 0 names the step; the others read it before each step."""
        store, global_step = self.ctx.store, self.progress.global_step
        if stop.is_set() and not self._stop_posted:
            store.set(_STOP_REQUESTED, str(self.rank))
            self._stop_posted = True
        if self._stop_at is None:
            if self.ctx.is_first:
                if store.check([_STOP_REQUESTED]):
                    # Rank 0 runs this step first: its peers may already be waiting inside it.
                    self._stop_at = global_step + 1
                    store.set(_STOP_AT, str(self._stop_at))
            elif store.check([_STOP_AT]):
                self._stop_at = int(store.get(_STOP_AT).decode())
        return self._stop_at is not None and global_step >= self._stop_at

    def _gather_weights(self) -> None:
        """Rank 0 receives every stage's current weights (and BatchNorm statistics)."""
        mine = {k: v.cpu() for k, v in self.method.stages[self.rank].state_dict().items()}
        gathered: list[Any] = [None] * self.ctx.world_size if self.ctx.is_first else []
        dist.gather_object(mine, gathered if self.ctx.is_first else None, dst=0, group=self.ctx.control)
        if self.ctx.is_first:
            _check_shared_copies(self.method, gathered)
            for k, state in enumerate(gathered):
                if k != 0:
                    self.method.stages[k].load_state_dict(state)

    def evaluate(self) -> tuple[float, float] | None:
        self._gather_weights()
        if not self.ctx.is_first:
            return None
        assert self.test_loader is not None
        return evaluate(self.method, self.test_loader)

    def shared_tally(self, tally: EpochTally) -> EpochTally:
        tallies: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(tallies, tally.state() if self.ctx.is_last else None, group=self.ctx.control)
        return EpochTally(**tallies[-1])

    def shared_record(self, record: dict[str, Any] | None) -> dict[str, Any]:
        return dict(self._broadcast(record))

    def record_extras(self) -> dict[str, Any]:
        # Figures with one entry per stage: rank r holds stage r, so entry r comes from rank r, and
        # the joined list is the one a single process reports.
        per_rank: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(per_rank, (self.held_stage_memory, self.method.epoch_metrics()), group=self.ctx.control)
        stage_memory = [memory for memory, _ in per_rank]
        measured = all(memory is not None for memory in stage_memory)
        extras: dict[str, Any] = {
            "activation_bytes": sum(m["total_bytes"] for m in stage_memory) if measured else None,
            "stage_memory": stage_memory if measured else None,
            "workers": self.ctx.world_size,
        }
        for key in per_rank[0][1]:
            extras[key] = [metrics[key][rank] for rank, (_, metrics) in enumerate(per_rank)]
        return extras

    def checkpoint(self) -> Path:
        """All ranks: drain messages, save shards, then rank 0 commits the manifest."""
        p = self.progress
        self.executor.drain()
        shard = {
            "method_state": self.method.shard_state(self.rank),
            "rng": torch.get_rng_state(),
            "tally": p.tally.state() if self.ctx.is_last else None,
            "stage_memory": self.held_stage_memory,
        }
        digest = self.folder.save_shard(p.global_step, self.rank, shard)
        digests: list[Any] = [None] * self.ctx.world_size if self.ctx.is_first else []
        # Also the barrier: every shard is on disk (and read back) before the manifest points to them.
        dist.gather_object(digest, digests if self.ctx.is_first else None, dst=0, group=self.ctx.control)
        if self.ctx.is_first:
            record = {
                "config": self.config.to_dict(),
                "world_size": self.ctx.world_size,
                "stage_sizes": self.stage_sizes,
                "epoch": p.epoch,
                "step_in_epoch": p.step_in_epoch,
                "global_step": p.global_step,
                "history": p.history,
                "changes": p.changes,
                "shard_sha256": {f"rank{r}.pt": d for r, d in enumerate(digests)},
                "all_local": self.ctx.local_world_size == self.ctx.world_size,
            }
            self.folder.commit_manifest(p.global_step, record, previous=self._good_manifest)
            # A copy: the history list grows with the next epoch, this manifest must not.
            self._good_manifest = copy.deepcopy(self.folder.manifest_record(p.global_step, record))
        dist.barrier(group=self.ctx.control)
        self.folder.prune_shards(p.global_step, keep_step=self._good_step)
        self._good_step = p.global_step
        return self.folder.path

    def finish(self) -> None:
        self.precision.wrap(self.activations.wrap(self.method.flush))()
        self.executor.wait_sends()
        self._gather_weights()
        if self.ctx.is_first:
            self.folder.write_model(self.model.state_dict())
        dist.barrier(group=self.ctx.control)


def _peer_failure(ctx: DistContext, wait_s: float = 3.0) -> dict[str, Any] | None:
    """The failure another rank (or the launcher, for a killed rank) reports within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            failure = ctx.watchdog.failure()
        except Exception:  # the store is gone too
            return None
        if failure is not None and failure["rank"] != ctx.rank:
            return failure
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def train_rank(config: TrainConfig, *, on_step: StepCallback | None = None) -> RunResult:
    """Run this process's rank of a multi-process run (started by torchrun or the launcher).

    Raises:
        ConfigError, DataError: bad options or data, on the rank that found them.
        TrainingDiverged: on the last rank; the others stop when the watchdog sees the failure.
        RunInterrupted: on every rank, after the agreed stop and checkpoint.
    """
    ctx = join(config.device)
    backend = None
    lock = None
    try:
        if ctx.is_first and not os.environ.get(AGENT_STORE_ENV) and config.out is not None:
            # Under torchrun rank 0 owns the folder (under gradkit's launcher, the launcher does).
            folder = RunFolder(config.out)
            lock = folder.lock(create=not config.resume)
            folder.remove_stale_temp_files()
        backend = StageProcessBackend(config, ctx)
        result = Trainer(backend).run(on_step)
    except RunInterrupted:
        ctx.close()
        raise
    except BaseException as exc:
        if not isinstance(exc, GradkitError | KeyboardInterrupt):
            # A lost connection is the symptom, not the cause: name the rank that failed first.
            peer = _peer_failure(ctx)
            if peer is not None:
                raise PeerFailed(f"rank {ctx.rank}: stopping: rank {peer['rank']} failed: {peer['message']}") from None
        reason = str(exc) if isinstance(exc, GradkitError) else f"{type(exc).__name__}: {exc}"
        ctx.watchdog.fail(reason)
        if isinstance(exc, GradkitError):  # the CLI prints it as one line; say which rank
            exc.args = (f"rank {ctx.rank}: {exc}",)
        raise
    finally:
        if backend is not None and backend.shared_memory is not None:
            backend.shared_memory.close()
        if lock is not None:
            lock.release()
    ctx.close()
    return result
