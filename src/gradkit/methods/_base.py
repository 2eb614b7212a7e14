"""The interface every training method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy
from gradkit.optim import OptimizerConfig, OptimizerFactory

__all__ = ["Method", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Method(ABC):
    """A way of turning mini-batches into parameter updates on a model split into stages.

    A method owns the stages it is given (``nn.Sequential`` partitions sharing the model's
    parameters), builds its optimizer(s) with the factory, and exposes one training step at a time.
    Evaluation never goes through a method's pipeline: :meth:`predict` runs the current weights.

    Subclasses implement :meth:`step`, and extend :meth:`state_dict` / :meth:`load_state_dict` with any
    in-flight buffers so that a resumed run continues exactly.

    Args:
        stages: consecutive partitions of the model, e.g. from :func:`gradkit.split`.
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (mean over the batch); default
            :func:`gradkit.losses.cross_entropy` (per token for ``(N, T, V)`` outputs).
        optimizer: a factory ``params -> torch.optim.Optimizer``.
    """

    name: str = ""

    @classmethod
    def stage_parallel_form(cls) -> type[Method] | None:
        """The class that runs this method with one process per stage (``--workers``), or None.

        A :class:`~gradkit.methods.PipelineMethod` is its own stage-parallel form; ``bp`` answers with
        its synchronous pipeline; methods that need the whole model in one process answer None.
        """
        return None

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        if len(stages) == 0:
            raise ValueError("a method needs at least one stage")
        self.stages: list[nn.Module] = list(stages)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else cross_entropy
        self.optimizer_factory: OptimizerFactory = (
            optimizer if optimizer is not None else OptimizerConfig().factory()
        )
        self.update_observers: list[Callable[[int, int, Sequence[nn.Parameter]], None]] = []
        """Called as ``observer(stage, batch, params)`` before each optimizer step, with the gradients
        about to be applied in ``p.grad`` (the direction diagnostics use it)."""

    # -- training ---------------------------------------------------------------------------------
    @abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Train on one mini-batch; returns the loss computed during this step."""

    @property
    @abstractmethod
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer the method steps (one, or one per stage)."""

    def flush(self) -> None:
        """Drain in-flight work (no-op for methods that keep none)."""
        return None

    def buffer_bytes(self) -> int:
        """Bytes held in in-flight buffers between steps (0 for backprop)."""
        return 0

    def epoch_metrics(self) -> dict[str, Any]:
        """Method-specific figures for each epoch's record in ``metrics.jsonl``: each a list with one
        entry per stage, in stage order (with one process per stage, each fills its own entry)."""
        return {}

    def stage_buffers(self) -> list[dict[str, list[torch.Tensor]]]:
        """Per stage, the tensors held between steps by category (FIFO, stashed graphs, ...)."""
        return [{} for _ in self.stages]

    @property
    def steady_step(self) -> int:
        """The first step at which every stage runs its full workload (memory is measured there)."""
        return 0

    def _notify_update(self, stage: int, batch: int, params: Sequence[nn.Parameter]) -> None:
        for observer in self.update_observers:
            observer(stage, batch, params)

    def set_lr_factor(self, factor: float) -> None:
        """Scale every parameter group's initial learning rate by ``factor`` (used by schedules) and by
        the group's own ``lr_scale`` (e.g. a stale stage's smaller steps), if it has one."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor * group.get("lr_scale", 1.0)

    # -- inference --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stages in order with autograd enabled (the full model's forward)."""
        for stage in self.stages:
            x = stage(x)
        return x

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Model output for ``x`` on the current weights, without a graph."""
        return self.forward(x)

    def train(self) -> Method:
        """Put every stage in training mode."""
        for stage in self.stages:
            stage.train()
        return self

    def eval(self) -> Method:
        """Put every stage in evaluation mode."""
        for stage in self.stages:
            stage.eval()
        return self

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the stages, each once, in stage order."""
        seen: set[int] = set()
        params = []
        for stage in self.stages:
            for p in stage.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: stage weights and buffers, optimizer states."""
        return {
            "method": self.name,
            "stages": [stage.state_dict() for stage in self.stages],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the state belongs to another method or another number of stages.
            ConfigError: it holds another number of optimizer states (another gradkit version).
        """
        if state.get("method") != self.name:
            raise ValueError(f"state is for method {state.get('method')!r}, not {self.name!r}")
        if len(state["stages"]) != len(self.stages):
            raise ValueError(
                f"state has {len(state['stages'])} stages but this method has {len(self.stages)}"
            )
        if len(state["optimizers"]) != len(self.optimizers):
            # E.g. a checkpoint written before parameters shared by stages got one optimizer of their own.
            raise ConfigError(
                f"the checkpoint holds {len(state['optimizers'])} optimizer states but {self.name} on this "
                f"model has {len(self.optimizers)}; it was written by another version of gradkit: start a "
                "new run (without --resume)"
            )
        for stage, sd in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(sd)
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)


def scale_lr(group: dict[str, Any], scale: float) -> None:
    """Give a parameter group steps ``scale`` times its base rate (a stale stage's smaller steps, FR's
    doubled first stage), now and at every :meth:`Method.set_lr_factor`. The base rate stays
    ``initial_lr``, which is what a ``--resume`` with another ``--lr`` replaces. The current rate is
    scaled as it is, so a schedule's factor already set (a warm-up's first step) is kept."""
    group.setdefault("initial_lr", group["lr"])
    group["lr_scale"] = group.get("lr_scale", 1.0) * scale
    group["lr"] = group["lr"] * scale
