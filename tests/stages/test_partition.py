"""gradkit.stages.partition: the exact partitions, against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from gradkit.errors import ConfigError
from gradkit.stages import fewest_bytes_partition, partition


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="cannot split 2 blocks into 3 stages"):
        partition([1.0, 2.0], 3)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        partition([1.0, -2.0], 1)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        partition([1.0, float("nan")], 1)


# --- partition ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("costs", "k", "sizes"),
    [
        ([1, 1, 1, 10], 2, [3, 1]),
        ([10, 1, 1, 1], 2, [1, 3]),
        ([1, 1, 1, 1], 2, [2, 2]),
        ([1] * 7, 3, [3, 2, 2]),  # as even as possible, earlier stages take the remainder
        ([1] * 5, 5, [1] * 5),
        ([3, 1, 4, 1, 5], 1, [5]),
        ([0, 0, 0], 2, [2, 1]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [5, 2, 2]),  # 15 | 13 | 17: max 17 is optimal
    ],
)
def test_partition_examples(costs: list[float], k: int, sizes: list[int]) -> None:
    assert partition(costs, k) == sizes


def _brute_force_max(costs: list[float], k: int) -> float:
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]
        sizes = partition(costs, k)
        assert len(sizes) == k and all(s >= 1 for s in sizes) and sum(sizes) == n
        bounds = list(itertools.accumulate([0, *sizes]))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        assert worst == _brute_force_max(costs, k), (costs, k, sizes)


def test_partition_is_fast_enough_for_deep_models() -> None:
    # resnet164 has 83 blocks; the O(k n^2) programme must stay well under a second.
    sizes = partition([float(i % 7 + 1) for i in range(83)], 8)
    assert sum(sizes) == 83 and len(sizes) == 8


# --- partition with a separate last group and cut costs; split(method=...) ----------------------


def test_partition_without_the_new_terms_is_unchanged() -> None:
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.random() * 10 for _ in range(n)]
        plain = partition(costs, k)
        assert partition(costs, k, last_costs=None, cut_costs=None) == plain
        assert partition(costs, k, last_costs=costs) == plain
        assert partition(costs, k, cut_costs=[0.0] * (n - 1)) == plain


def _brute_force_general(costs: list[float], last: list[float], cuts: list[float], k: int) -> float:
    n, best = len(costs), float("inf")
    for chosen in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *chosen, n)
        worst = 0.0
        for a, b in itertools.pairwise(bounds):
            c = sum((last if b == n else costs)[a:b])
            c += (cuts[a - 1] if a > 0 else 0.0) + (cuts[b - 1] if b < n else 0.0)
            worst = max(worst, c)
        best = min(best, worst)
    return best


def test_partition_with_last_and_cut_costs_is_optimal_against_brute_force() -> None:
    rng = random.Random(4)
    for _ in range(200):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]  # integers: exact sums
        last = [float(rng.randint(0, 20)) for _ in range(n)]
        cuts = [float(rng.randint(0, 6)) for _ in range(n - 1)]
        sizes = partition(costs, k, last_costs=last, cut_costs=cuts)
        assert len(sizes) == k and min(sizes) >= 1 and sum(sizes) == n
        bounds = list(itertools.accumulate([0, *sizes]))
        worst = max(
            sum((last if b == n else costs)[a:b])
            + (cuts[a - 1] if a > 0 else 0.0)
            + (cuts[b - 1] if b < n else 0.0)
            for a, b in itertools.pairwise(bounds)
        )
        assert worst == _brute_force_general(costs, last, cuts, k), (costs, last, cuts, k)


def test_partition_checks_the_new_cost_lists() -> None:
    with pytest.raises(ConfigError, match="last_costs has 1 entries, need 2"):
        partition([1.0, 2.0], 1, last_costs=[1.0])
    with pytest.raises(ConfigError, match="cut_costs has 2 entries, need 1"):
        partition([1.0, 2.0], 1, cut_costs=[1.0, 1.0])
    with pytest.raises(ConfigError, match="cut_costs must be finite and >= 0"):
        partition([1.0, 2.0], 2, cut_costs=[-1.0])


# --- fewest bytes at the cuts (backward-locked pipelines) ---------------------------------------


def _compositions(n: int, k: int) -> list[list[int]]:
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        out.append([b - a for a, b in itertools.pairwise(bounds)])
    return out


def _bytes_key(
    sizes: list[int], costs: list[float], nbytes: list[int], cuts: list[float]
) -> tuple[int, float]:
    n = len(costs)
    bounds = list(itertools.accumulate([0, *sizes]))
    sent = sum(nbytes[b - 1] for b in bounds[1:-1])
    worst = max(
        sum(costs[a:b]) + (cuts[a - 1] if a > 0 else 0.0) + (cuts[b - 1] if b < n else 0.0)
        for a, b in itertools.pairwise(bounds)
    )
    return sent, worst


def test_fewest_bytes_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]  # integers: exact sums
        nbytes = [rng.randint(0, 5) for _ in range(n - 1)]
        cuts = [float(b) for b in nbytes]
        sizes = fewest_bytes_partition(costs, k, cut_bytes=nbytes, cut_costs=cuts)
        assert len(sizes) == k and min(sizes) >= 1 and sum(sizes) == n
        got = _bytes_key(sizes, costs, nbytes, cuts)
        best = min(_bytes_key(s, costs, nbytes, cuts) for s in _compositions(n, k))
        assert got == best, (costs, nbytes, k, sizes)
        # Ties go to the largest earliest groups: the lexicographically largest sizes among the best.
        ties = [s for s in _compositions(n, k) if _bytes_key(s, costs, nbytes, cuts) == best]
        assert sizes == max(ties), (costs, nbytes, k, sizes)


def test_fewest_bytes_partition_examples_and_errors() -> None:
    # Equal bytes everywhere: the most even slowest group decides.
    assert fewest_bytes_partition([1.0] * 8, 2, cut_bytes=[4] * 7) == [4, 4]
    # A small activation after block 2 wins over an even split.
    assert fewest_bytes_partition([1.0] * 4, 2, cut_bytes=[9, 1, 9]) == [2, 2]
    assert fewest_bytes_partition([1.0] * 4, 2, cut_bytes=[9, 9, 1]) == [3, 1]
    with pytest.raises(ConfigError, match="cut_bytes has 1 entries, need 3"):
        fewest_bytes_partition([1.0] * 4, 2, cut_bytes=[1])
    with pytest.raises(ConfigError, match="cut_bytes must be ints >= 0"):
        fewest_bytes_partition([1.0] * 3, 2, cut_bytes=[1, -1])
    with pytest.raises(ConfigError, match="cut_bytes must be ints >= 0"):
        fewest_bytes_partition([1.0] * 3, 2, cut_bytes=[1.5, 1])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="cannot split 3 blocks into 4 stages"):
        fewest_bytes_partition([1.0] * 3, 4, cut_bytes=[1, 1])
