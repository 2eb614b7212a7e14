"""The records a dataset loader returns: :class:`DatasetInfo`, :class:`Dataset`, :class:`DatasetStatus`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradkit.errors import DataError

__all__ = ["DatasetInfo", "Dataset", "DatasetStatus", "TASKS"]

TASKS = ("classification", "next-token")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Example:
        >>> info = DatasetInfo("toy", (1, 8, 8), 2, ("a", "b"), (0.5,), (0.25,), False, "generated")
        >>> info.input_shape
        (1, 8, 8)
    """

    name: str
    """Registry name, e.g. ``"cifar10"``."""
    input_shape: tuple[int, ...]
    """Shape of one example, ``(C, H, W)`` for images."""
    num_classes: int
    """Number of classes; labels are ``0 .. num_classes - 1``."""
    classes: tuple[str, ...]
    """Class names, indexed by label."""
    mean: tuple[float, ...]
    """Per-channel mean of the train split scaled to [0, 1]."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the train split scaled to [0, 1]."""
    augment: bool
    """Whether training batches get random crop (4-pixel padding) and horizontal flip."""
    source: str
    """Path the data was read from, or ``"generated"`` / ``"scikit-learn"``."""
    task: str = "classification"
    """``classification`` (one label per example) or ``next-token``: examples are int64 token ids
    ``(T,)``, targets the next token at every position ``(T,)``, classes the vocabulary; the model
    outputs ``(N, T, num_classes)``, the loss is per token and epochs report bits per token."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes"
            )
        channels = self.input_shape[0] if self.input_shape else 0
        if self.task == "next-token":
            channels = 0  # token ids are not normalised
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({channels})")


@dataclass
class Dataset:
    """Train and test splits held in memory as tensors.

    ``*_x`` are ``uint8`` ``(N, C, H, W)`` for 8-bit images (scale by 1/255), or ``float32`` already in
    [0, 1]; ``*_y`` are ``int64`` ``(N,)``. For ``info.task == "next-token"`` both are ``int64``
    ``(N, T)``: token ids and the next token at every position. Images stay uint8 in memory (CIFAR-10 train is 150 MB so,
    600 MB as float); :class:`~gradkit.data.BatchLoader` converts one batch at a time.
    """

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    model_args: dict[str, Any] = field(default_factory=dict)
    """Arguments the models for this data need from it, passed to ``build_model``: a text dataset's
    ``vocab_size``, a graph dataset's ``graph`` (examples are then node ids; the graph is in the model)."""

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if self.info.task == "next-token":
                if x.dtype != torch.int64 or y.dtype != torch.int64 or x.dim() != 2 or x.shape != y.shape:
                    raise DataError(
                        f"{self.info.name}: next-token {split} data must be int64 token ids (N, T) with "
                        f"targets of the same shape (got {x.dtype} {tuple(x.shape)}, {y.dtype} {tuple(y.shape)})"
                    )
            elif x.dtype not in (torch.uint8, torch.float32):
                raise DataError(
                    f"{self.info.name}: {split}_x has dtype {x.dtype}; need uint8 or float32"
                )
            elif y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DataError(
                    f"{self.info.name}: {split} labels must be int64 with one label per example "
                    f"(got {y.dtype} {tuple(y.shape)} for {len(x)} examples)"
                )
            if tuple(x.shape[1:]) != tuple(self.info.input_shape):
                raise DataError(
                    f"{self.info.name}: {split} examples have shape {tuple(x.shape[1:])}, "
                    f"expected {tuple(self.info.input_shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.info.num_classes):
                raise DataError(
                    f"{self.info.name}: {split} labels fall outside 0..{self.info.num_classes - 1} "
                    f"(min {int(y.min())}, max {int(y.max())})"
                )


@dataclass(frozen=True)
class DatasetStatus:
    """Where one dataset was found, or how to get it (what ``gradkit datasets`` prints)."""

    name: str
    """Registry name."""
    found: str | None
    """Path it would be read from (or ``"scikit-learn"`` / ``"generated"``); ``None`` when missing."""
    searched: tuple[str, ...]
    """Places looked at, in order (empty for datasets that need no files)."""
    hint: str
    """How to get it when missing; a short note otherwise."""
    help: str = ""
    """One-line description from the registry."""

    @property
    def available(self) -> bool:
        """Whether ``load_dataset(name)`` would find the data without downloading."""
        return self.found is not None
