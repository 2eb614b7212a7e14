"""The peak of the bytes held by live tensors during a step, as torch operations create and free them.

Unlike ``torch.cuda.max_memory_allocated`` this leaves out library workspaces (cuDNN's convolution
workspace, measured ~130 MiB for ResNet-20 at batch 128 on an H200), which do not depend on how
activations are stored and set a floor under the allocator's peak. What is left is what activation
compression controls: saved copies, decoded copies and temporaries. Works on any device.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradkit.compress import Activations
from gradkit.models import build_model


class LiveTensorPeak(TorchDispatchMode):
    """Inside it, ``peak`` is the most bytes that tensors made by torch operations held at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:  # views share their base's storage
            return
        self.live[key] = size
        self.current += size
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self.live.pop(key, None)
        if size is not None:
            self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out


def resnet_step_peak(mode: str, batch: int, device: torch.device | str) -> int:
    """Live-tensor peak of the second SGD step of ResNet-20 (the first creates the optimizer state)."""
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    act = Activations(model, mode)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with act:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()
    tracker = LiveTensorPeak()
    with tracker:
        step()
    act.close()
    return tracker.peak
