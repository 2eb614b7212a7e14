"""Cut a row of block costs into ``k`` contiguous groups: one exact dynamic programme, two objectives.

A group's cost is the sum of its blocks' costs, with two optional terms for pipeline schedules whose
stages do not all work alike: ``last_costs`` (per-block costs used instead of ``costs`` in the last
group; Features Replay's last stage skips the replay forward) and ``cut_costs`` (the message at a cut,
paid by both groups beside it).

- :func:`partition` minimises the largest group's cost; among the optimal partitions the most even
  one (smallest sum of squared group costs), then the one with the largest earliest groups.
- :func:`fewest_bytes_partition` minimises the bytes sent at the cuts, then the largest group's cost
  (a backward-locked pipeline computes the same total for every cut; only its messages differ).

Both run :func:`_best_groups`, which finds the best partition for any key that composes
monotonically from the last group back to the first.

Example:
    >>> partition([1, 1, 1, 10], 2)
    [3, 1]
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from gradkit.errors import ConfigError

__all__ = ["fewest_bytes_partition", "partition"]


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


_Key = TypeVar("_Key", bound=_Ordered)


def partition(
    costs: Sequence[float],
    k: int,
    *,
    last_costs: Sequence[float] | None = None,
    cut_costs: Sequence[float] | None = None,
) -> list[int]:
    """Sizes of ``k`` non-empty contiguous groups of ``costs`` minimising the largest group's cost.

    A group's cost is the sum of its blocks' ``costs``. Two optional terms generalise it for pipeline
    schedules whose stages do not all work alike (Features Replay's last stage skips the replay
    forward, and every stage pays for the messages at its boundaries):

    - ``last_costs``: the per-block costs used instead of ``costs`` for the *last* group;
    - ``cut_costs[i]``: added to both groups next to a cut between block ``i`` and block ``i + 1``.

    Without them the result is exactly the plain partition. Exact dynamic programme, O(k n^2) for n
    costs. Among the partitions with the smallest maximum it returns the one with the smallest sum of
    squared group costs (the most even overall), and among those the one with the largest earliest
    groups.

    Args:
        costs: non-negative, finite cost of each block.
        k: number of groups, ``1 <= k <= len(costs)``.
        last_costs: optional non-negative cost of each block when it is in the last group.
        cut_costs: optional non-negative cost of each of the ``len(costs) - 1`` possible cuts.

    Returns:
        Group sizes, each >= 1, summing to ``len(costs)``.

    Raises:
        ConfigError: ``k`` out of range, a cost negative or not finite, or an optional cost list of
            the wrong length.

    Example:
        >>> partition([1, 1, 1, 10], 2)
        [3, 1]
        >>> partition([1, 1, 1, 1], 2, last_costs=[0.5] * 4)  # the last group is cheaper per block
        [1, 3]
    """
    cost, n = _group_cost(costs, last_costs, cut_costs)
    k = check_k(k, n)
    # First the smallest possible maximum, then the most even partition within that bound. The
    # bound compares exactly with the second pass because both evaluate the same cost(i, e).
    bound, _ = _best_groups(n, k, 0.0, lambda i, e, rest: max(cost(i, e), rest))

    def squares(i: int, e: int, rest: float) -> float | None:
        c = cost(i, e)
        return None if c > bound else c * c + rest

    return _best_groups(n, k, 0.0, squares)[1]


def fewest_bytes_partition(
    costs: Sequence[float],
    k: int,
    *,
    cut_bytes: Sequence[int],
    last_costs: Sequence[float] | None = None,
    cut_costs: Sequence[float] | None = None,
) -> list[int]:
    """Sizes of ``k`` contiguous groups sending the fewest bytes at their cuts, then the cheapest.

    The partition minimises ``(bytes at the cuts, largest group's cost)`` lexicographically, with
    group costs as in :func:`partition`. Bytes are ints, so ties are exact; among equal keys the
    earliest groups are the largest (as in :func:`partition`).

    Args:
        costs, last_costs, cut_costs: as in :func:`partition`.
        k: number of groups, ``1 <= k <= len(costs)``.
        cut_bytes: bytes sent at each of the ``len(costs) - 1`` possible cuts (ints >= 0).

    Raises:
        ConfigError: as :func:`partition`, or ``cut_bytes`` of the wrong length or not ints >= 0.
    """
    cost, n = _group_cost(costs, last_costs, cut_costs)
    k = check_k(k, n)
    sent = [_as_int(b) for b in cut_bytes]
    if len(sent) != max(n - 1, 0):
        raise ConfigError(f"cut_bytes has {len(sent)} entries, need {max(n - 1, 0)} (one per cut)")
    if any(b is None or b < 0 for b in sent):
        raise ConfigError(f"cut_bytes must be ints >= 0, got {list(cut_bytes)!r}")
    at_cut = [int(b) for b in sent if b is not None]

    def key(i: int, e: int, rest: tuple[int, float]) -> tuple[int, float]:
        # Both parts compose monotonically (bytes add, the slowest group is a max).
        return (rest[0] + (at_cut[e - 1] if e < n else 0), max(cost(i, e), rest[1]))

    return _best_groups(n, k, (0, 0.0), key)[1]


def _best_groups(
    n: int, k: int, empty: _Key, extend: Callable[[int, int, _Key], _Key | None]
) -> tuple[_Key, list[int]]:
    """The smallest key over partitions of ``n`` blocks into ``k`` contiguous groups, and its sizes.

    ``extend(i, e, rest)`` is the key of blocks ``i..n-1`` when the first group is ``i..e-1`` and the
    remaining groups have key ``rest`` (``empty`` for no blocks), or None where that group is not
    allowed. It must be monotone in ``rest``, so that the best suffix is part of the best whole.
    Ties keep the earliest groups largest. O(k n^2) calls of ``extend``.
    """
    # best[j][i]: smallest key when blocks i..n-1 form j groups; nxt[j][i]: where its first ends.
    best: list[list[_Key | None]] = [[None] * (n + 1) for _ in range(k + 1)]
    nxt = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][n] = empty
    for j in range(1, k + 1):
        for i in range(n - j, -1, -1):
            # Largest first group first, so ties keep the earlier groups larger.
            for e in range(n - j + 1, i, -1):
                rest = best[j - 1][e]
                if rest is None:
                    continue
                candidate = extend(i, e, rest)
                if candidate is None:
                    continue
                current = best[j][i]
                if current is None or candidate < current:
                    best[j][i], nxt[j][i] = candidate, e
    found = best[k][0]
    assert found is not None, "every k <= n has a partition"
    sizes, i = [], 0
    for j in range(k, 0, -1):
        e = nxt[j][i]
        sizes.append(e - i)
        i = e
    return found, sizes


def _group_cost(
    costs: Sequence[float],
    last_costs: Sequence[float] | None,
    cut_costs: Sequence[float] | None,
) -> tuple[Callable[[int, int], float], int]:
    """The cost of the group of blocks ``i..e-1``, checked inputs included, and the block count."""
    values = _check_costs("costs", costs, None)
    n = len(values)
    last = values if last_costs is None else _check_costs("last_costs", last_costs, n)
    cuts = None if cut_costs is None else _check_costs("cut_costs", cut_costs, max(n - 1, 0))
    prefix = list(itertools.accumulate(values, initial=0.0))
    last_prefix = prefix if last_costs is None else list(itertools.accumulate(last, initial=0.0))

    def cost(i: int, e: int) -> float:
        # Always the same expression, so bounds found with it compare exactly with it.
        c = (last_prefix[e] - last_prefix[i]) if e == n else (prefix[e] - prefix[i])
        if cuts is not None:
            # A stage pays for the message at each of its cuts (the one below and the one above).
            c += (cuts[i - 1] if i > 0 else 0.0) + (cuts[e - 1] if e < n else 0.0)
        return c

    return cost, n


def _check_costs(name: str, costs: Sequence[float], n: int | None) -> list[float]:
    values = [float(c) for c in costs]
    if n is not None and len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries, need {n} (one per block or cut)")
    bad = [c for c in values if not math.isfinite(c) or c < 0]
    if bad:
        raise ConfigError(
            f"{name} must be finite and >= 0, got {bad[0]!r}; pass one cost per block"
        )
    return values


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer type (numpy ints too), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_k(k: int, n: int) -> int:
    """``k`` as an int if ``1 <= k <= n`` stages of ``n`` blocks are possible, else a ConfigError."""
    k_int = _as_int(k)
    if k_int is None:
        raise ConfigError(f"k must be an int number of stages, got {k!r}; use 1 <= k <= {n}")
    k = k_int
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}; use k between 1 and {max(n, 1)}")
    if k > n:
        raise ConfigError(f"cannot split {n} blocks into {k} stages; use k <= {n}")
    return k
