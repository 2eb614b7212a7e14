"""Language-model shapes a user may bring (outside gradkit), for the error-message tests of issue 14:
``--model lm_user_model:FACTORY``. Each follows the factory contract but returns something the default
loss cannot score against the data's targets."""

from __future__ import annotations

import torch
from torch import nn


class _Tokens(nn.Module):
    """Per-token logits ``(N, 4, num_classes)`` from any input."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(features, 4 * num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1).float()).view(x.shape[0], 4, self.num_classes)


class _LogitsAndLoss(nn.Module):
    """nanoGPT's habit: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.fc(x.flatten(1).float())
        loss = None if targets is None else nn.functional.cross_entropy(logits, targets)
        return logits, loss


def per_token(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Per-token logits of 4 positions whatever the data (wrong for labels and for other lengths)."""
    return nn.Sequential(_Tokens(int(torch.tensor(input_shape).prod()), num_classes))


def logits_and_loss(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """A last block that returns a tuple."""
    return nn.Sequential(_LogitsAndLoss(int(torch.tensor(input_shape).prod()), num_classes))
