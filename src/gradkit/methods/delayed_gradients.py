"""DDG: decoupled parallel backpropagation with delayed gradients (Huo, Gu, Yang, Huang, ICML 2018).

The schedule is Features Replay's, but stage k keeps the *autograd graph* of each of its last K-k
batches and backpropagates the oldest one with the stale δ: no recomputation, O(LK + K²) memory
(FR paper, Table 1). A faithful DDG takes the gradient at the weights the batch was forwarded with,
so every in-flight batch builds its graph on a stashed copy of the stage's parameters
(``torch.func.functional_call``); keeping a plain graph across ``optimizer.step()`` fails on current
PyTorch with "modified by an inplace operation".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from gradkit.methods._base import LossFn
from gradkit.methods._pipelined import PipelineMethod
from gradkit.methods._registry import METHODS
from gradkit.methods.features_replay import ReplaySchedule
from gradkit.pipeline.batchnorm import frozen_running_stats
from gradkit.pipeline.schedule import DELTA, Action, Op, Schedule
from gradkit.pipeline.shared import accumulate_grad
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["DelayedGradients", "DelayedGradientSchedule", "DelayedGradientStage"]


@dataclass
class _Stash:
    """One in-flight batch: its input, the weights it saw, its graph, and the tensors the graph saved."""

    batch: int
    x: torch.Tensor
    weights: dict[str, torch.Tensor]
    output: torch.Tensor | None = None


def graph_saved_tensors(output: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph behind ``output`` saved for backward (read, not unpacked twice).

    Walks the graph's nodes and reads their ``_saved_*`` attributes; only used when memory is measured.
    """
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            value = getattr(node, attr)
            values = value if isinstance(value, (tuple, list)) else (value,)
            found.extend(v for v in values if isinstance(v, torch.Tensor))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


class DelayedGradientSchedule(ReplaySchedule):
    """DDG: Features Replay's timing, but the forward keeps its graph and the backward runs K-1-k
    steps later, with no recomputation."""

    name = "ddg"
    forward_op, backward_op = Op.FORWARD, Op.BACKWARD


class DelayedGradientStage(PipelineStage):
    """One DDG stage: forward on stashed weights now, backward K-1-k steps later."""

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss_fn: LossFn) -> None:
        super().__init__(index, num_stages, module, optimizer, loss_fn=loss_fn)
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.stash: deque[_Stash] = deque()

    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if action.op is Op.FORWARD:
            weights = {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}
            entry = _Stash(action.batch, received["activation"].detach(), weights)
            self._build_graph(entry)
            self.stash.append(entry)
            assert entry.output is not None
            return {"activation": entry.output.detach()}
        if action.op is Op.BACKWARD:
            return self._backward(action.batch, received[DELTA])
        raise self.unknown(action)

    def _build_graph(self, entry: _Stash) -> None:
        """Forward ``entry.x`` with autograd on the stashed weights."""
        entry.x = self.input_for_grad(entry.x)
        leaves = {n: w.requires_grad_(True) for n, w in entry.weights.items()}
        entry.output = functional_call(self.module, leaves, (entry.x,))

    def _backward(self, batch: int, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        entry = self.stash.popleft()
        if entry.batch != batch:
            raise PipelineError(f"stage {self.index} backpropagates batch {batch} but its oldest graph is batch {entry.batch}")
        assert entry.output is not None
        self.optimizer.zero_grad(set_to_none=True)
        leaves = [entry.weights[n] for n in self.names]
        inputs = leaves + ([entry.x] if entry.x.requires_grad else [])
        grads = torch.autograd.grad(entry.output, inputs, delta, allow_unused=True)
        params = dict(self.module.named_parameters())
        for name, g in zip(self.names, grads, strict=False):
            # Added, not assigned: another stage's use of a shared parameter may have added to it already.
            accumulate_grad(params[name], g)
        if entry.x.requires_grad:
            x_grad = grads[-1]
            return {DELTA: x_grad if x_grad is not None else torch.zeros_like(entry.x)}
        return {}

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        weights = [w for e in self.stash for w in e.weights.values()]
        own = {b.untyped_storage().data_ptr() for b in self.module.buffers()}
        own.update(w.untyped_storage().data_ptr() for w in weights)
        graphs = [e.x for e in self.stash]
        for e in self.stash:
            if e.output is not None:
                graphs += [t for t in graph_saved_tensors(e.output) if t.untyped_storage().data_ptr() not in own]
        return {"stashed_graphs": graphs, "stashed_weights": weights}

    def buffer_state(self) -> dict[str, Any]:
        # Graphs cannot be saved; the input and stashed weights rebuild them exactly on load.
        return {"stash": [(e.batch, e.x.detach(), {n: w.detach() for n, w in e.weights.items()})
                          for e in self.stash]}

    def load_buffer_state(self, state: dict[str, Any]) -> None:
        self.stash = deque()
        for batch, x, weights in state["stash"]:
            entry = _Stash(batch, x, {n: w.clone() for n, w in weights.items()})
            # The original forward already updated BatchNorm's running statistics.
            with frozen_running_stats(self.module):
                self._build_graph(entry)
            self.stash.append(entry)

    def reset(self) -> None:
        self.stash.clear()


@METHODS.register("ddg", help="delayed gradients with weight stashing: stages keep their graphs (Huo et al. 2018)")
class DelayedGradients(PipelineMethod):
    """DDG over K stages (see the module docstring).

    Args:
        stages, loss_fn, optimizer: see :class:`~gradkit.methods.Method`.
        record_timeline: keep every executed action in ``executor.timeline``.
        stale_lr: ``none``, ``inverse`` or ``sqrt``: smaller steps for stages with older gradients;
            default ``auto`` (see :class:`~gradkit.methods.features_replay.FeaturesReplay`).
        clip_grad_norm: clip each stage's gradient to this norm before its update (0: off).
        stale_momentum: Adam's β1 (SGD's momentum) for the stages whose gradients are stale, None for
            the optimizer's; default ``auto`` (as ``stale_lr``).
    """

    name = "ddg"

    @classmethod
    def schedule_for(cls, num_stages: int, **options: Any) -> Schedule:
        return DelayedGradientSchedule(num_stages)

    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        return DelayedGradientStage(index, len(self.stages), module, optimizer, loss_fn=self.loss_fn)
