"""Parameters that several stages use (tied embeddings, shared blocks): one state, the summed gradient.

A language model's input embedding is often the output head's weight too (Press & Wolf, "Using the
Output Embedding to Improve Language Models", EACL 2017), so split into stages its first and last stage
hold the same ``nn.Parameter``; a block reused at two depths does the same. Its gradient is the sum of
the gradients of all its uses, and it must be updated once with that sum: two stage optimizers would
keep two momentum states and apply two updates per step.

Pipelined methods therefore leave a shared parameter out of every stage's optimizer and give it to one
:class:`SharedUpdate`: during a pipeline step each use adds its gradient to ``p.grad`` (stages never
zero or overwrite a shared parameter's gradient), and after the step the executor sums the uses across
processes (:meth:`Executor.sum_shared <gradkit.pipeline.local.Executor>`: nothing to do in one
process; an all-reduce among the ranks holding the parameter with one process per stage, as
pipeline-parallel language models do for tied embeddings: Shoeybi et al., "Megatron-LM", 2019;
Narayanan et al., SC 2021), then one optimizer steps and the gradient is cleared. Every copy applies
the same sum with the same optimizer state, so copies on different ranks never drift.

The sum is over the uses that computed a gradient in that step. With stale-gradient methods those come
from different batches: under FR and DDG with K stages, the use in stage k trains on batch t-(K-1-k) at
step t (so a tied embedding's update at step t is the head's gradient of batch t plus the embedding's
of batch t-K+1), exactly as each stage's own parameters do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gradkit.pipeline.stage import UpdateObserver

__all__ = ["GradientSum", "SharedParameter", "SharedUpdate", "accumulate_grad", "shared_buffers", "shared_parameters"]


@dataclass(frozen=True)
class SharedParameter:
    """A trainable parameter used by more than one stage.

    Attributes:
        param: the parameter (the same object in every stage).
        stages: the stages that use it, ascending.
        names: its name in each of those stages (e.g. ``embed.token.weight``, ``head.proj.weight``).
    """

    param: nn.Parameter
    stages: tuple[int, ...]
    names: tuple[str, ...]


def shared_parameters(stages: Sequence[nn.Module]) -> list[SharedParameter]:
    """The trainable parameters that more than one of ``stages`` uses, in order of first use.

    Example:
        >>> first, last = gradkit.split(gradkit.models.build_model("gpt", (32,), 65), 2)
        >>> [(s.stages, s.names) for s in shared_parameters([first, last])]
        [((0, 1), ('embed.token.weight', 'head.proj.weight'))]
    """
    uses: dict[int, tuple[nn.Parameter, list[int], list[str]]] = {}
    for k, stage in enumerate(stages):
        for name, p in stage.named_parameters():  # each parameter once per stage
            if not p.requires_grad:
                continue
            _, indices, names = uses.setdefault(id(p), (p, [], []))
            indices.append(k)
            names.append(name)
    return [SharedParameter(p, tuple(ks), tuple(ns)) for p, ks, ns in uses.values() if len(ks) > 1]


def shared_buffers(stages: Sequence[nn.Module]) -> list[tuple[str, tuple[int, ...]]]:
    """Buffers (e.g. BatchNorm running statistics) that more than one stage holds: (name, stages)."""
    uses: dict[int, tuple[str, list[int]]] = {}
    for k, stage in enumerate(stages):
        for name, b in stage.named_buffers():
            uses.setdefault(id(b), (name, []))[1].append(k)
    return [(name, tuple(ks)) for name, ks in uses.values() if len(ks) > 1]


class GradientSum(Protocol):
    """Makes each shared parameter's ``.grad`` the sum over all its uses (an executor's job)."""

    def sum_shared(self, shared: Sequence[SharedParameter]) -> None: ...


class SharedUpdate:
    """The one optimizer of the shared parameters, stepped once per pipeline step with summed gradients.

    Args:
        shared: from :func:`shared_parameters`.
        optimizer: the parameters -> optimizer factory the stages use (same hyper-parameters).
    """

    def __init__(self, shared: Sequence[SharedParameter],
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.shared = list(shared)
        self.optimizer: torch.optim.Optimizer | None = (
            optimizer([s.param for s in self.shared]) if self.shared else None)
        self.observers: list[UpdateObserver] = []

    def __bool__(self) -> bool:
        return bool(self.shared)

    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.shared]

    def ids(self) -> set[int]:
        return {id(s.param) for s in self.shared}

    def step(self, summer: GradientSum) -> None:
        """After a pipeline step: sum the uses' gradients, step once, clear the gradients.

        A parameter none of whose uses produced a gradient in this step (a pipeline's warm-up) is
        skipped by the optimizer, as torch optimizers skip parameters whose ``.grad`` is None.
        """
        if self.optimizer is None:
            return
        summer.sum_shared(self.shared)
        updated = [s.param for s in self.shared if s.param.grad is not None]
        if updated:
            for observer in self.observers:
                observer(self.shared[0].stages[0], -1, updated)
            self.optimizer.step()
        for s in self.shared:
            s.param.grad = None


def accumulate_grad(p: nn.Parameter, grad: torch.Tensor | None) -> None:
    """Add ``grad`` to ``p.grad`` as autograd does (a stage that assigns gradients must not overwrite
    another use's contribution to a shared parameter)."""
    if grad is None:
        return
    p.grad = grad if p.grad is None else p.grad + grad
