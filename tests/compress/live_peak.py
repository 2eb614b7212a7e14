"""A ResNet-20 step's live-tensor peak (:class:`gradkit.compress.LiveTensorPeak`), for the CPU and GPU
peak-memory tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradkit.compress import Activations, LiveTensorPeak
from gradkit.models import build_model


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
