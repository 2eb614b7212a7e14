"""Stratified subsets, for quick runs on a slice of a dataset (``limit_train`` / ``limit_test``)."""

from __future__ import annotations

import torch

from gradkit.errors import ConfigError

__all__ = ["stratified_subset", "class_quotas"]


def class_quotas(counts: list[int], n: int, order: list[int]) -> list[int]:
    """How many examples to take from each class: as equal as possible, never more than a class has.

    Classes too small for an equal share give all they have and the rest is shared among the others
    (water-filling). Leftover single examples go to classes in ``order``.
    """
    quota = [0] * len(counts)
    remaining = n
    while remaining > 0:
        open_classes = [c for c in order if quota[c] < counts[c]]
        share = remaining // len(open_classes)
        if share == 0:
            for c in open_classes[:remaining]:
                quota[c] += 1
            break
        for c in open_classes:
            add = min(share, counts[c] - quota[c])
            quota[c] += add
            remaining -= add
    return quota


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples with classes as balanced as possible (per-class counts differ by at most 1
    unless a class runs out), chosen at random but fixed by ``seed``.

    Args:
        y: integer labels ``(N,)``.
        n: how many to keep. ``n >= N`` keeps the whole split (all indices), so a limit larger than a
            small dataset is not an error.
        seed: chooses which examples; the same ``(y, n, seed)`` always gives the same indices.

    Returns:
        Sorted int64 indices into ``y`` (original order kept).

    Raises:
        ConfigError: ``n`` is not positive.

    Example:
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> torch.bincount(y[stratified_subset(y, 4, seed=0)]).tolist()
        [2, 2]
    """
    if n <= 0:
        raise ConfigError(f"a subset size must be positive, got {n}")
    total = len(y)
    if n >= total:
        return torch.arange(total)
    y = y.cpu().long()
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    # Which classes get the leftover +1 is random too, so no class is favoured by its index.
    order = torch.randperm(len(classes), generator=generator).tolist()
    quota = class_quotas(counts.tolist(), n, order)
    picks = []
    for cls, q in zip(classes.tolist(), quota, strict=True):
        if q:
            members = torch.nonzero(y == cls).flatten()
            picks.append(members[torch.randperm(len(members), generator=generator)[:q]])
    return torch.sort(torch.cat(picks)).values
