"""Devices: moving restored state onto a stage's device, and forking the random state of one device.

Checkpoints are read with ``map_location="cpu"`` (:mod:`gradkit.checkpoint`), so every tensor of a
pipeline's in-flight state (FR's FIFO of inputs, DDG's stashed inputs and weights, DNI's pending
outputs, the executor's messages) comes back on the CPU. :func:`move_to` is the one place that puts
such nested state on the device of the stage that owns it (:meth:`PipelineMethod.load_state_dict`
and ``load_shard_state`` call it); stages never move tensors themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

__all__ = ["fork_rng", "module_device", "move_to"]

T = TypeVar("T")


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of ``module``'s first parameter (else its first buffer, else ``default`` or CPU)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return default if default is not None else torch.device("cpu")


def move_to(state: T, device: torch.device) -> T:
    """``state`` with every tensor inside moved to ``device`` (dtypes kept).

    Walks dicts, lists, tuples (named ones too), deques and dataclass instances, and rebuilds each
    container with the same type; anything else (ints, strings, None) is returned as is. A tensor
    already on ``device`` is returned unchanged (``Tensor.to`` does not copy then).
    """
    if isinstance(state, torch.Tensor):
        return state.to(device)  # type: ignore[return-value]
    if isinstance(state, dict):
        return type(state)((k, move_to(v, device)) for k, v in state.items())  # type: ignore[call-arg]
    if isinstance(state, deque):
        return deque((move_to(v, device) for v in state), maxlen=state.maxlen)  # type: ignore[return-value]
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple
        return type(state)(*(move_to(v, device) for v in state))
    if isinstance(state, (list, tuple)):
        return type(state)(move_to(v, device) for v in state)  # type: ignore[call-arg]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        changes = {f.name: move_to(getattr(state, f.name), device)
                   for f in dataclasses.fields(state) if f.init}
        return dataclasses.replace(state, **changes)  # type: ignore[type-var]
    return state


@contextlib.contextmanager
def fork_rng(device: torch.device) -> Iterator[None]:
    """Fork the CPU random state, and that of ``device`` when it is an accelerator; restored on exit.

    ``torch.random.fork_rng`` takes ``device_type`` as a string on every torch gradkit supports (None
    raises TypeError on torch 2.11), and CUDA devices by index; a ``torch.device("cuda")`` without
    an index means the current device.
    """
    if device.type == "cpu" or device.type == "meta":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    index = device.index
    if index is None:
        module = getattr(torch, device.type)
        index = module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield
