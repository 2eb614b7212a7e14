"""The common base of pipelined methods (FR, DDG, DNI, bp's synchronous form): stages driven by a schedule."""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from gradkit.devices import module_device, move_to
from gradkit.errors import ConfigError
from gradkit.memory import tensor_bytes
from gradkit.methods._base import LossFn, Method
from gradkit.methods._staleness import (
    AUTO,
    SEQUENCE_STALE_LR,
    SEQUENCE_STALE_MOMENTUM,
    apply_stale_steps,
    awaits_auto_steps,
    check_staleness_options,
    resolve_auto_steps,
    stale_lr_scale,
)
from gradkit.optim import OptimizerFactory
from gradkit.pipeline.boundary import is_sequence_boundary, stage_output_shapes
from gradkit.pipeline.local import Executor, LocalExecutor
from gradkit.pipeline.schedule import Schedule
from gradkit.pipeline.shared import SharedUpdate, shared_parameters
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["PipelineMethod"]

log = logging.getLogger(__name__)


class PipelineMethod(Method):
    """A method whose stages update independently, in the order a :class:`Schedule` gives.

    Each stage gets its own optimizer and a :class:`PipelineStage`; a :class:`LocalExecutor` runs the
    schedule in this process. A parameter that several stages use (a tied embedding) is in no stage's
    optimizer: one :class:`~gradkit.pipeline.shared.SharedUpdate` applies the sum of its uses' gradients
    once after every step (``self.shared``). A subclass is one file holding its schedule, its stage and its cost
    for the balancer (:meth:`block_seconds`); registering it makes it available everywhere, with one
    process per stage too (``--workers``). The epoch boundary does not drain the pipeline (batches
    in flight carry over, as in the reference code); :meth:`flush` does.

    Args:
        stages, loss_fn, optimizer: see :class:`Method`.
        record_timeline: keep every executed (step, stage, action, batch) in ``executor.timeline``.
    """

    backward_locked: ClassVar[bool] = False
    """Whether a stage waits for the backward pass of the stages above it (the synchronous pipeline).
    The balancer then predicts a step as the sum of the stages, not as the slowest one."""

    @classmethod
    def stage_parallel_form(cls) -> type[PipelineMethod]:
        return cls

    @classmethod
    def block_seconds(cls, forward_s: float, backward_s: float, *, last: bool,
                      synthesizer_fraction: float = 0.0) -> float:
        """Compute seconds per step of one block (profiled forward and backward) in a stage that is,
        or is not, the last one; the balancer (:mod:`gradkit.stages.cost_model`) sums these per stage."""
        return forward_s + backward_s

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        record_timeline: bool = False,
        stale_lr: str = AUTO,
        clip_grad_norm: float = 0.0,
        stale_momentum: float | str | None = AUTO,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer)
        check_staleness_options(stale_lr, stale_momentum)
        self.stale_lr, self.stale_momentum = stale_lr, stale_momentum
        if isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float)) or not (
                math.isfinite(clip_grad_norm) and clip_grad_norm >= 0):
            raise ConfigError(f"clip_grad_norm must be a number >= 0 (0: no clipping), got {clip_grad_norm!r}")
        self.schedule = self.schedule_for(len(self.stages), **self.schedule_options())
        self.shared = SharedUpdate(shared_parameters(self.stages), self.optimizer_factory)
        self.shared.observers = self.update_observers
        shared = self.shared.ids()
        self.pipeline_stages: list[PipelineStage] = []
        for k, stage in enumerate(self.stages):
            params = [p for p in stage.parameters() if p.requires_grad and id(p) not in shared]
            pipeline_stage = self.make_stage(k, stage, self._stage_optimizer(params))
            pipeline_stage.observers = self.update_observers
            pipeline_stage.clip_grad_norm = float(clip_grad_norm)
            staleness = self.schedule.first_update(k)
            for group in pipeline_stage.optimizer.param_groups:
                apply_stale_steps(group, staleness, stale_lr, stale_momentum)
            self.pipeline_stages.append(pipeline_stage)
        self.executor: Executor = LocalExecutor(self.schedule, self.pipeline_stages,
                                                record_timeline=record_timeline)
        self._step = 0
        """Steps since the pipeline was last empty; batch ids count from there."""

    def _stage_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # A stage whose parameters are all shared (or that has none) still gets an optimizer, with an
        # empty group: torch refuses an empty parameter list.
        return self.optimizer_factory(params if params else [{"params": []}])  # type: ignore[list-item]

    @classmethod
    @abstractmethod
    def schedule_for(cls, num_stages: int, **options: Any) -> Schedule:
        """The schedule this method runs on ``num_stages`` stages (``options``: :meth:`schedule_options`)."""

    def schedule_options(self) -> dict[str, Any]:
        """The method options its schedule depends on (passed to :meth:`schedule_for`)."""
        return {}

    @abstractmethod
    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        """The pipeline stage ``index``, running ``module`` with ``optimizer``."""

    # -- training ---------------------------------------------------------------------------------------
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        opts = [s.optimizer for s in self.pipeline_stages]
        for s in self.pipeline_stages:
            opts.extend(s.extra_optimizers())
        if self.shared.optimizer is not None:
            opts.append(self.shared.optimizer)
        return opts

    @property
    def steady_step(self) -> int:
        return self.schedule.drain_steps()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.prepare(x)
        loss = self.run_step(x, y)
        if loss is None:  # the last stage runs every batch in its own step; a schedule bug otherwise
            raise PipelineError(f"{self.name}: the last stage produced no loss at step {self._step - 1}")
        return loss

    def run_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
        """One pipeline iteration on the executor; the loss if this process runs the last stage.

        With a :class:`~gradkit.distributed.DistributedExecutor` only rank 0 passes data (the others
        pass None) and only the last rank gets a loss back.
        """
        self.pipeline_stages[-1].last_loss = None
        self._run_executor_step(self._step, x, y)
        self._step += 1
        return self.pipeline_stages[-1].last_loss

    def _run_executor_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                           *, last_batch: int | None = None) -> None:
        """One step of every stage, then the shared parameters' one update (summed over their uses)."""
        self.executor.run_step(step, x, y, last_batch=last_batch)
        self.shared.step(self.executor)

    def prepare(self, sample: torch.Tensor) -> None:
        """Settle what depends on the shapes between stages from a sample batch: the ``auto`` steps of
        stale stages here, DNI's synthesizers in its subclass.

        Idempotent (called before every step; a no-op once settled, also after a resume); every
        process of a multi-process run calls it with the same sample, so that lazily built modules
        get the same initial weights everywhere.
        """
        pending = [k for k, stage in enumerate(self.pipeline_stages)
                   if any(awaits_auto_steps(group) for group in stage.optimizer.param_groups)]
        if not pending:
            return
        shapes = stage_output_shapes(self.stages, sample)
        changed = []
        for k in pending:
            sequence = is_sequence_boundary(shapes[k])
            staleness = self.schedule.first_update(k)
            results = [resolve_auto_steps(group, staleness, self.stale_lr, self.stale_momentum, sequence=sequence)
                       for group in self.pipeline_stages[k].optimizer.param_groups]
            if any(results):
                changed.append(k)
        if changed:
            self._report_auto_steps(changed)

    def _report_auto_steps(self, stages: list[int]) -> None:
        """One line saying which stages got staleness-aware steps by default, and how to turn them off."""
        what = []
        if self.stale_lr == AUTO:
            scales = [stale_lr_scale(SEQUENCE_STALE_LR, self.schedule.first_update(k)) for k in stages]
            what.append("lr x " + ", ".join(f"{scale:.3g}" for scale in scales))
        if self.stale_momentum == AUTO:
            what.append(f"momentum {SEQUENCE_STALE_MOMENTUM:g}")
        who = (f"stage {stages[0]} hands on a sequence (N, T, C) and gets" if len(stages) == 1
               else f"stages {', '.join(map(str, stages))} hand on sequences (N, T, C) and get")
        log.info(f"{self.name}: {who} stale gradients: staleness-aware steps there "
                 f"({'; '.join(what)}); -o stale_lr=none -o stale_momentum=none for the paper's rule")

    def use_executor(self, executor: Executor) -> None:
        """Run the schedule on ``executor`` instead of the single-process one (e.g. one rank per stage)."""
        self.executor = executor

    def flush(self) -> None:
        """Finish every batch in flight (K-1 steps without new data for FR and DDG)."""
        if self._step == 0:
            return
        last_batch = self._step - 1
        for i in range(self.schedule.drain_steps()):
            self._run_executor_step(self._step + i, last_batch=last_batch)
        if not self.executor.empty():
            raise PipelineError(f"{self.name}: messages left after draining the pipeline")
        for s in self.pipeline_stages:
            s.reset()
        self._step = 0

    # -- memory -----------------------------------------------------------------------------------------
    def stage_buffers(self) -> list[dict[str, list[torch.Tensor]]]:
        per_stage = [dict(s.buffers()) for s in self.pipeline_stages]
        for k, tensors in self.executor.in_flight().items():
            if 0 <= k < len(per_stage):
                per_stage[k]["messages"] = tensors
        return per_stage

    def buffer_bytes(self) -> int:
        return tensor_bytes(t for stage in self.stage_buffers() for ts in stage.values() for t in ts)

    # -- persistence ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["pipeline"] = {
            "step": self._step,
            "channels": self.executor.state(),
            "buffers": [s.buffer_state() for s in self.pipeline_stages],
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pipeline = state.get("pipeline")
        if pipeline is None:
            raise ValueError(f"state for {self.name!r} has no pipeline buffers")
        buffers = pipeline["buffers"] if "buffers" in pipeline else pipeline["workers"]  # older checkpoints
        if len(buffers) != len(self.pipeline_stages):
            raise ValueError(f"state has {len(buffers)} stages but this method has {len(self.pipeline_stages)}")
        # Buffers first: DNI's synthesizers (and so their optimizers) must exist before the
        # optimizer states are loaded. DDG rebuilds its graphs from the stashed weights, not the stage's.
        # Checkpoints load on the CPU: each stage's buffers and messages go to that stage's device.
        for k, (pipeline_stage, state_of_stage) in enumerate(zip(self.pipeline_stages, buffers, strict=True)):
            pipeline_stage.load_buffer_state(move_to(state_of_stage, self.stage_device(k)))
        super().load_state_dict(state)
        self.executor.load_state(self._channels_on_devices(pipeline["channels"]))
        self._step = pipeline["step"]

    def stage_device(self, index: int) -> torch.device:
        """Where stage ``index`` runs: the device of its parameters (restored state goes there); a
        stage without parameters or buffers runs where the rest of the model is."""
        return module_device(self.stages[index], default=module_device(nn.ModuleList(self.stages)))

    def _channels_on_devices(self, channels: list[Any]) -> list[Any]:
        """Executor channel state (kind, source, destination, messages) with each message on its
        destination stage's device."""
        moved = []
        for kind, source, destination, messages in channels:
            device = self.stage_device(destination) if 0 <= destination < len(self.stages) else None
            moved.append((kind, source, destination, messages if device is None else move_to(messages, device)))
        return moved

    def shard_state(self, rank: int) -> dict[str, Any]:
        """What stage ``rank`` alone must save to resume: its weights, optimizers, buffers and messages.

        The multi-process executor must have been drained (no message on the wire).
        """
        pipeline_stage = self.pipeline_stages[rank]
        return {
            "method": self.name,
            "stage": rank,
            "num_stages": len(self.stages),
            "weights": self.stages[rank].state_dict(),
            "optimizers": [opt.state_dict() for opt in [pipeline_stage.optimizer, *pipeline_stage.extra_optimizers()]],
            # Every rank keeps its copy of the shared parameters' optimizer (the same state on each).
            "shared_optimizer": None if self.shared.optimizer is None else self.shared.optimizer.state_dict(),
            "buffers": pipeline_stage.buffer_state(),
            "channels": self.executor.state(),
            "step": self._step,
        }

    def load_shard_state(self, rank: int, state: dict[str, Any]) -> None:
        """Restore what :meth:`shard_state` returned for stage ``rank``."""
        if state.get("method") != self.name or state.get("stage") != rank or state.get("num_stages") != len(self.stages):
            raise ValueError(
                f"shard is for {state.get('method')!r} stage {state.get('stage')} of {state.get('num_stages')}, "
                f"not {self.name!r} stage {rank} of {len(self.stages)}"
            )
        pipeline_stage = self.pipeline_stages[rank]
        # First: DNI's synthesizer optimizer must exist. Shards load on the CPU: buffers go to the stage's device.
        pipeline_stage.load_buffer_state(move_to(state["buffers"], self.stage_device(rank)))
        self.stages[rank].load_state_dict(state["weights"])
        optimizers = [pipeline_stage.optimizer, *pipeline_stage.extra_optimizers()]
        for opt, sd in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        if (self.shared.optimizer is None) != (state.get("shared_optimizer") is None):
            raise ValueError("shard and model disagree on parameters shared by several stages")
        if self.shared.optimizer is not None:
            self.shared.optimizer.load_state_dict(state["shared_optimizer"])
        self.executor.load_state(self._channels_on_devices(state["channels"]))
        self._step = state["step"]
