"""The training loop of one rank in a multi-process stage pipeline (one process per stage).

Every rank runs the same epochs and steps as :func:`gradkit.train` would in one process, but only its
own stage's column of the schedule (:class:`~gradkit.distributed.executor.DistributedExecutor`):

* rank 0 loads the data, augments each batch and feeds stage 0; labels go to the stages that need
  them (the last one, and every DNI stage) as messages, so no other rank loads images;
* the last rank computes the loss: it keeps the epoch's loss tally, shows the progress bar and notices
  divergence;
* at the end of each epoch, the stages' current weights are gathered on rank 0, which evaluates the
  model outside the pipeline (in-flight batches stay in flight, as in one process) and writes
  ``metrics.jsonl``;
* checkpoints are sharded (:mod:`gradkit.distributed.shards`): each rank saves its stage, optimizer,
  buffers and received messages; rank 0 then commits a manifest.

Ctrl-C (SIGINT, or SIGTERM from torchrun) on any rank asks rank 0 to stop; rank 0 names the step
after which every rank stops, so the checkpoint they write is consistent.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from gradkit import methods as _methods
from gradkit.checkpoint import atomic_write, write_json_atomic
from gradkit.compress import Activations
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, load_dataset
from gradkit.distributed import shards
from gradkit.distributed.context import DistContext, join
from gradkit.distributed.executor import DistributedExecutor
from gradkit.errors import ConfigError, GradkitError, TrainingDiverged
from gradkit.loop import (
    CONFIG,
    METRICS,
    MODEL,
    RunInterrupted,
    RunResult,
    StepCallback,
    _append_metrics,
    _EpochTally,
    _rewrite_metrics,
    evaluate,
)
from gradkit.methods import PipelineMethod
from gradkit.methods.synchronous import SynchronousPipeline
from gradkit.models import build_model
from gradkit.stages import check_stage_sizes, default_threads, split

__all__ = ["PIPELINED_METHODS", "train_worker", "default_threads"]

log = logging.getLogger(__name__)

PIPELINED_METHODS = ("fr", "ddg", "dni", "bp")
"""Methods that run with one process per stage (``bp``: the synchronous, backward-locked pipeline)."""

_STOP_REQUESTED = "gradkit/stop_requested"
_STOP_AT = "gradkit/stop_at"
_REPEAT_S = 3.0


def check_config(config: TrainConfig, world_size: int) -> None:
    """Options that cannot work with one process per stage, as one-line errors."""
    if config.method not in PIPELINED_METHODS:
        raise ConfigError(
            f"--workers runs one process per stage, which needs a pipelined method; "
            f"{config.method!r} is not one of: {', '.join(PIPELINED_METHODS)}"
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


def _build_method(config: TrainConfig, stages: Sequence[torch.nn.Module]) -> PipelineMethod:
    factory = config.optimizer_config().factory()
    if config.method == "bp":
        if config.method_options:
            raise ConfigError(f"bp takes no options, got: {', '.join(config.method_options)}")
        return SynchronousPipeline(stages, optimizer=factory)
    method = _methods.build(config.method, stages, optimizer=factory, **config.method_options)
    assert isinstance(method, PipelineMethod)
    return method


@contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set a flag (the loop turns it into an agreed stop); a later one aborts.

    A second signal within :data:`_REPEAT_S` seconds is the same request arriving twice (a terminal's
    Ctrl-C reaches every process of a torchrun job, and torchrun forwards it once more), not an abort.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    first: list[float] = []

    def handler(signum: int, frame: object) -> None:
        if not first:
            first.append(time.monotonic())
            stop.set()
        elif time.monotonic() - first[0] > _REPEAT_S:
            raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _DistributedRun:
    """The state of one rank's run; :func:`train_worker` is its only user."""

    def __init__(self, config: TrainConfig, ctx: DistContext) -> None:
        check_config(config, ctx.world_size)
        self.config, self.ctx = config, ctx
        self.rank = ctx.rank
        self.out = config.out_path
        assert self.out is not None
        torch.set_num_threads(config.threads or default_threads(ctx.local_world_size))

        # Rank 0 reads the manifest and the data; every rank gets what it needs to build the model.
        setup: dict[str, Any] = {}
        self.train_loader: BatchLoader | None = None
        self.test_loader: BatchLoader | None = None
        if ctx.is_first:
            setup = self._load_on_rank_zero()
        setup = self._broadcast(setup)
        self.num_train = setup["num_train"]
        self.batch_size = config.batch_size
        self.steps_per_epoch = math.ceil(self.num_train / self.batch_size)

        torch.manual_seed(config.seed)
        self.model = build_model(config.model, setup["input_shape"], setup["num_classes"],
                                 **setup["model_args"]).to(ctx.device)
        self.stage_sizes = setup["stage_sizes"] or self._choose_split(setup["sample"])
        stages = split(self.model, sizes=self.stage_sizes)
        self.method = _build_method(config, stages)
        self.activations = Activations(self.model, config.activations, group_size=config.activation_group_size)
        self.method.prepare(setup["sample"].to(ctx.device))
        self.shared_memory = ctx.shared_memory()
        self.executor = DistributedExecutor(self.method.schedule, self.method.workers[self.rank],
                                            ctx.groups, ctx.device, shared_memory=self.shared_memory,
                                            local_peers=ctx.local_peers)
        self.method.use_executor(self.executor)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.tally = _EpochTally()
        self.history: list[dict[str, Any]] = []
        self._stop_posted = False
        self._stop_at: int | None = None
        """The global step after which every rank stops (agreed through the store after Ctrl-C)."""
        if setup["resume"] is not None:
            self._restore(setup["resume"])

    # -- set-up -----------------------------------------------------------------------------------
    def _load_on_rank_zero(self) -> dict[str, Any]:
        config = self.config
        assert self.out is not None
        resume = None
        if config.resume:
            manifest = shards.read_manifest(self.out)
            conflicts = config.resume_conflicts(TrainConfig.from_dict(manifest["config"]))
            if conflicts:
                raise ConfigError(
                    f"--resume with different options than the run in {self.out}: {'; '.join(conflicts)}; "
                    "use the original options (only --epochs, --threads and --device may change)"
                )
            if manifest["world_size"] != self.ctx.world_size:
                raise ConfigError(f"{self.out} was written by {manifest['world_size']} workers; resume with as many")
            resume = manifest
        elif shards.has_checkpoint(self.out):
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        dataset = load_dataset(config.data, config.data_dir, download=config.download,
                               limit_train=config.limit_train, limit_test=config.limit_test, seed=config.seed)
        info = dataset.info
        self.train_loader = BatchLoader(dataset.train_x, dataset.train_y, info, config.batch_size,
                                        train=True, seed=config.seed, device=self.ctx.device)
        self.test_loader = BatchLoader(dataset.test_x, dataset.test_y, info, config.eval_batch_size,
                                       train=False, seed=config.seed, device=self.ctx.device)
        first, _ = next(iter(self.train_loader.epoch(0)))  # a sample for shapes and time balancing
        return {
            "num_train": len(dataset.train_y),
            "input_shape": tuple(info.input_shape),
            "num_classes": info.num_classes,
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
        config, blocks = self.config, len(self.model)
        if config.stages > blocks:
            raise ConfigError(
                f"--stages {config.stages} is more than the {blocks} blocks of {config.model}; use --stages <= {blocks}"
            )
        if config.stage_sizes:
            return check_stage_sizes(config, blocks)
        sizes = None
        if self.ctx.is_first:
            # Only rank 0 decides (time balancing is measured, so ranks could disagree).
            # balance="time" uses the method's cost model: FR's early stages pay the replay forward.
            timed = config.balance == "time"
            stages = split(self.model, config.stages, balance=config.balance,
                           sample=sample.to(self.ctx.device) if timed else None,
                           method=config.method if timed else None)
            sizes = [len(s) for s in stages]
        return list(self._broadcast(sizes))

    def _restore(self, manifest: dict[str, Any]) -> None:
        assert self.out is not None
        shard = shards.load_shard(self.out, manifest, self.rank)
        self.method.load_shard_state(self.rank, shard["method_state"])
        torch.set_rng_state(shard["rng"])
        self.epoch, self.step_in_epoch = manifest["epoch"], manifest["step_in_epoch"]
        self.global_step = manifest["global_step"]
        self.tally = _EpochTally(**shard["tally"]) if shard.get("tally") else _EpochTally()
        self.history = list(manifest["history"])
        if self.ctx.is_first:
            _rewrite_metrics(self.out / METRICS, self.history)
            log.info("resuming %s at epoch %d step %d", self.out, self.epoch + 1, self.step_in_epoch)

    # -- persistence ------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """All ranks: drain messages, save shards, then rank 0 commits the manifest."""
        assert self.out is not None
        self.executor.drain()
        shard = {
            "method_state": self.method.shard_state(self.rank),
            "rng": torch.get_rng_state(),
            "tally": self.tally.state() if self.ctx.is_last else None,
        }
        shards.save_shard(self.out, self.global_step, self.rank, shard)
        dist.barrier(group=self.ctx.control)  # every shard is on disk before the manifest points to them
        if self.ctx.is_first:
            shards.commit(self.out, self.global_step, {
                "config": self.config.to_dict(),
                "world_size": self.ctx.world_size,
                "stage_sizes": self.stage_sizes,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "history": self.history,
            })
        dist.barrier(group=self.ctx.control)
        shards.prune(self.out, self.global_step)

    # -- training ---------------------------------------------------------------------------------
    def run(self, on_step: StepCallback | None) -> RunResult:
        config = self.config
        assert self.out is not None
        if self.ctx.is_first:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / CONFIG, {**config.to_dict(), "stage_sizes": self.stage_sizes,
                                                  "workers": self.ctx.world_size})
        schedule = config.lr_schedule()
        self.method.train()
        with _stop_signals() as stop:
            while self.epoch < config.epochs:
                self._train_epoch(schedule, stop, on_step)
                self._end_epoch()
        with self.activations:
            self.method.flush()
        self.executor.wait_sends()
        self._gather_weights()
        if self.ctx.is_first:
            atomic_write(self.out / MODEL, lambda f: torch.save(self.model.state_dict(), f))
        dist.barrier(group=self.ctx.control)
        return RunResult(config, self.history, None, self.stage_sizes, self.method, self.model)

    def _batch_size(self, step_in_epoch: int) -> int:
        return min(self.batch_size, self.num_train - step_in_epoch * self.batch_size)

    def _should_stop(self, stop: threading.Event) -> bool:
        """Agree on a stop: rank 0 names the step; the others read it before each step."""
        store = self.ctx.store
        if stop.is_set() and not self._stop_posted:
            store.set(_STOP_REQUESTED, str(self.rank))
            self._stop_posted = True
        if self._stop_at is None:
            if self.ctx.is_first:
                if store.check([_STOP_REQUESTED]):
                    # Rank 0 runs this step first: its peers may already be waiting inside it.
                    self._stop_at = self.global_step + 1
                    store.set(_STOP_AT, str(self._stop_at))
            elif store.check([_STOP_AT]):
                self._stop_at = int(store.get(_STOP_AT).decode())
        return self._stop_at is not None and self.global_step >= self._stop_at

    def _train_epoch(self, schedule: Any, stop: threading.Event, on_step: StepCallback | None) -> None:
        config, epoch, ctx = self.config, self.epoch, self.ctx
        steps = self.steps_per_epoch
        bar = tqdm(total=steps, initial=self.step_in_epoch, desc=f"{config.method} x{ctx.world_size} epoch "
                   f"{epoch + 1}/{config.epochs}", disable=not (config.progress and ctx.is_last),
                   leave=False, dynamic_ncols=True)
        tally = self.tally
        start = time.perf_counter() - tally.seconds
        run_seconds_before = self.history[-1]["elapsed_seconds"] if self.history else 0.0
        window = max(1, steps // 10)
        batches = (self.train_loader.epoch(epoch, start_step=self.step_in_epoch)
                   if self.train_loader is not None else None)
        while self.step_in_epoch < steps:
            if self._should_stop(stop):
                bar.close()
                self._interrupted()
            progress = epoch + self.step_in_epoch / steps
            self.method.set_lr_factor(schedule.factor(progress, total_epochs=config.epochs))
            x, y = next(batches) if batches is not None else (None, None)
            with self.activations:
                loss = self.method.run_step(x, y)
            n = self._batch_size(self.step_in_epoch)
            self.step_in_epoch += 1
            self.global_step += 1
            if loss is not None:  # the last rank
                if not math.isfinite(loss):
                    bar.close()
                    self._diverged(loss)
                tally.add(loss, n)
                elapsed = time.perf_counter() - start
                tally.seconds = elapsed
                if self.step_in_epoch % window == 0 or self.step_in_epoch == steps:
                    tally.close_window(epoch + self.step_in_epoch / steps, run_seconds_before + elapsed)
                bar.update(1)
                if self.step_in_epoch % 10 == 0 or self.step_in_epoch == steps:
                    bar.set_postfix({"loss": f"{loss:.4f}", "samples/s": f"{tally.samples / elapsed:.0f}"},
                                    refresh=False)
                if on_step is not None:
                    on_step(epoch, self.step_in_epoch, loss)
        bar.close()

    def _gather_weights(self) -> None:
        """Rank 0 receives every stage's current weights (and BatchNorm statistics)."""
        mine = {k: v.cpu() for k, v in self.method.stages[self.rank].state_dict().items()}
        gathered: list[Any] = [None] * self.ctx.world_size if self.ctx.is_first else []
        dist.gather_object(mine, gathered if self.ctx.is_first else None, dst=0, group=self.ctx.control)
        if self.ctx.is_first:
            for k, state in enumerate(gathered):
                if k != 0:
                    self.method.stages[k].load_state_dict(state)

    def _end_epoch(self) -> None:
        self._gather_weights()
        # The last rank holds the loss tally; everyone learns the record rank 0 builds.
        tallies: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(tallies, self.tally.state() if self.ctx.is_last else None, group=self.ctx.control)
        tally = _EpochTally(**tallies[-1])
        record = None
        if self.ctx.is_first:
            assert self.test_loader is not None
            eval_start = time.perf_counter()
            test_loss, test_acc = evaluate(self.method, self.test_loader)
            record = tally.record(
                epoch=self.epoch + 1, test_loss=test_loss, test_acc=test_acc,
                eval_seconds=time.perf_counter() - eval_start,
                elapsed_before=self.history[-1]["elapsed_seconds"] if self.history else 0.0,
                lr=self.method.optimizers[0].param_groups[0]["lr"], method=self.config.method,
            )
            # Activation memory is measured in one process only (gradkit.memory.measure_step).
            record.update(activation_bytes=None, stage_memory=None, workers=self.ctx.world_size)
        record = self._broadcast(record)
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.tally = _EpochTally()
        self.checkpoint()
        if self.ctx.is_first:
            assert self.out is not None
            _append_metrics(self.out / METRICS, record)
            log.info("epoch %d: train_loss %.4f test_loss %.4f test_acc %.4f (%.1fs)", record["epoch"],
                     record["train_loss"], record["test_loss"], record["test_acc"], record["epoch_seconds"])

    def _diverged(self, loss: float) -> None:
        where = f"epoch {self.epoch + 1} step {self.step_in_epoch}"
        kept = (f"the last good checkpoint in {self.out} is kept" if self.out is not None
                and shards.has_checkpoint(self.out) else "no checkpoint had been written yet")
        raise TrainingDiverged(f"loss became {loss} at {where}; {kept}; try a lower --lr", where=where)

    def _interrupted(self) -> None:
        self.checkpoint()
        where = f"epoch {self.epoch + 1} step {self.step_in_epoch}"
        raise RunInterrupted(f"interrupted at {where}; checkpoint saved to {self.out}; continue with --resume")


class PeerFailed(GradkitError):
    """Another rank failed, so this one stopped."""

    exit_code = 1


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


def train_worker(config: TrainConfig, *, on_step: StepCallback | None = None) -> RunResult:
    """Run this process's rank of a multi-process run (started by torchrun or the launcher).

    Raises:
        ConfigError, DataError: bad options or data, on the rank that found them.
        TrainingDiverged: on the last rank; the others stop when the watchdog sees the failure.
        RunInterrupted: on every rank, after the agreed stop and checkpoint.
    """
    ctx = join(config.device)
    run = None
    try:
        run = _DistributedRun(config, ctx)
        result = run.run(on_step)
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
        if run is not None and run.shared_memory is not None:
            run.shared_memory.close()
    ctx.close()
    return result
