"""Predict the step time of a multi-process stage pipeline, balance its stages, and choose K.

Each of K processes owns one stage of consecutive blocks, and the stages run concurrently. What a
block costs in a stage comes from the method itself: :func:`gradkit.methods.stage_parallel_class`
gives the class that runs a method with one process per stage, its ``block_seconds`` the compute per
step of one block in an early or in the last stage, and its ``backward_locked`` whether the stages
overlap. Per training step in steady state, for the methods gradkit ships:

- **fr** (Features Replay; Huo, Gu and Huang, "Training Neural Networks Using Features Replay",
  NeurIPS 2018, Algorithm 1): stage ``k < K-1`` plays the new batch forward without a graph (``F_k``)
  and replays an older batch forward and backward against its stale δ (``F_k + B_k``), so it computes
  ``2 F_k + B_k``; the last stage computes ``F + B`` once.
- **ddg** (Huo et al., "Decoupled Parallel Backpropagation with Convergence Guarantee", ICML 2018):
  the forward keeps its graph, so every stage computes ``F_k + B_k``.
- **dni** (Jaderberg et al., "Decoupled Neural Interfaces using Synthetic Gradients", ICML 2017):
  like ddg, plus the synthesizer of each stage but the last (``synthesizer_fraction`` of ``F + B``).
- **bp**: backprop cut into stages (its synchronous pipeline); backward-locked, so nothing overlaps
  and the step is the sum of every stage's ``F + B`` and of every message.

A stage sends its output up and the δ of its input down once per step; a message of ``m`` bytes takes
``latency_s + m / bandwidth_bytes_per_s``. The decoupled methods' step is the slowest stage's
compute + communication. Every device is assumed as fast as the one the blocks were profiled on, so
profile with the thread count each worker process will have. The single-process baseline
(``single_process_s``) is plain backprop on the whole machine: ``backprop_seconds`` of costs profiled
with all the cores (``threads=None`` on an otherwise idle machine).

Example:
    >>> costs = profile_blocks(model, x, threads=1)
    >>> whole = backprop_seconds(profile_blocks(model, x))
    >>> print(choose_stages(costs, 2, "fr", single_process_s=whole).summary())
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods import METHODS, PipelineMethod, stage_parallel_class, stage_parallel_names
from gradkit.stages.partition import fewest_bytes_partition, partition
from gradkit.stages.profile import BlockCost, profile_blocks

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_LATENCY",
    "AutoChoice",
    "BlockCost",
    "SplitPrediction",
    "StagePrediction",
    "backprop_seconds",
    "balanced_sizes",
    "check_method",
    "choose_stages",
    "predict_speedups",
    "predict_stages",
    "predict_step_seconds",
    "profile_block_costs",
]

#: Bytes per second of one message; measured through gloo over TCP loopback on one machine.
DEFAULT_BANDWIDTH = 0.9e9
#: Fixed cost per message in seconds (gloo loopback, same measurement).
DEFAULT_LATENCY = 1e-3


@dataclass(frozen=True)
class StagePrediction:
    """One stage of a predicted split: its blocks, compute and communication seconds per step."""

    stage: int
    blocks: int
    compute_s: float
    comm_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class SplitPrediction:
    """A method on ``k`` stages of ``sizes`` blocks: predicted step and speed-up over the baseline."""

    method: str
    k: int
    sizes: tuple[int, ...]
    stages: tuple[StagePrediction, ...]
    step_s: float
    speedup: float

    def table(self) -> str:
        """Per-stage compute, communication and total, in milliseconds."""
        lines = ["  stage  blocks  compute ms  comm ms  total ms"]
        for s in self.stages:
            lines.append(
                f"  {s.stage:5d}  {s.blocks:6d}  {1e3 * s.compute_s:10.3f}  "
                f"{1e3 * s.comm_s:7.3f}  {1e3 * s.total_s:8.3f}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class AutoChoice:
    """The best number of stages for ``workers`` processes, and every candidate considered."""

    method: str
    workers: int
    single_process_s: float
    best: SplitPrediction
    candidates: tuple[SplitPrediction, ...]

    @property
    def k(self) -> int:
        return self.best.k

    @property
    def sizes(self) -> list[int]:
        return list(self.best.sizes)

    @property
    def step_s(self) -> float:
        return self.best.step_s

    @property
    def speedup(self) -> float:
        return self.best.speedup

    def summary(self) -> str:
        """A few lines: the choice, its predicted step and speed-up, then every K's stage table."""
        lines = [
            f"{self.method} with up to {self.workers} workers: K={self.k} stages, sizes {self.sizes}",
            f"predicted step {1e3 * self.step_s:.3f} ms vs {1e3 * self.single_process_s:.3f} ms "
            f"single-process backprop: speed-up {self.speedup:.2f}x",
        ]
        for c in self.candidates:
            what = "no split (single-process backprop)" if c.k == 1 else f"sizes {list(c.sizes)}"
            lines.append(
                f"K={c.k}: {what}, step {1e3 * c.step_s:.3f} ms, speed-up {c.speedup:.2f}x"
            )
            if c.k > 1:
                lines.append(c.table())
        return "\n".join(lines)


def check_method(method: str) -> str:
    """``method`` if it can run one process per stage, else a :class:`ConfigError` naming those that can."""
    names = stage_parallel_names()
    if method not in names:
        what = "unknown method" if method not in METHODS.names() else "no stage-parallel form of method"
        raise ConfigError(f"{what} {method!r} for the cost model; use one of: {', '.join(names)}")
    return method


def _method_class(method: str) -> type[PipelineMethod]:
    cls = stage_parallel_class(check_method(method))
    assert cls is not None  # check_method accepts only names with a stage-parallel class
    return cls


def profile_block_costs(
    model: nn.Sequential, sample: torch.Tensor, *, threads: int | None = None, repeats: int = 3
) -> list[BlockCost]:
    """Deprecated: use :func:`gradkit.stages.profile_blocks`, which now returns the same costs."""
    warnings.warn(
        "gradkit.stages.cost_model.profile_block_costs is deprecated; use "
        "gradkit.stages.profile_blocks (same arguments, same BlockCost list)",
        DeprecationWarning,
        stacklevel=2,
    )
    return profile_blocks(model, sample, threads=threads, repeats=repeats)


def backprop_seconds(costs: Sequence[BlockCost]) -> float:
    """Predicted single-process backprop step: the sum of every block's forward and backward."""
    return math.fsum(c.total_s for c in costs)


def _message_s(nbytes: int, bandwidth: float, latency: float) -> float:
    return latency + nbytes / bandwidth


def _check_link(bandwidth: float, latency: float, synthesizer_fraction: float) -> None:
    if not (bandwidth > 0):  # also rejects NaN
        raise ConfigError(
            f"bandwidth_bytes_per_s must be > 0, got {bandwidth!r}; use math.inf for free"
        )
    if not (latency >= 0 and math.isfinite(latency)):
        raise ConfigError(f"latency_s must be finite and >= 0, got {latency!r}")
    if not (synthesizer_fraction >= 0 and math.isfinite(synthesizer_fraction)):
        raise ConfigError(
            f"synthesizer_fraction must be finite and >= 0, got {synthesizer_fraction!r}"
        )


def _block_compute(
    cls: type[PipelineMethod], cost: BlockCost, last: bool, synthesizer_fraction: float
) -> float:
    """One block's compute per step, in a stage that is (or is not) the last one."""
    return cls.block_seconds(
        cost.forward_s, cost.backward_s, last=last, synthesizer_fraction=synthesizer_fraction
    )


def predict_stages(
    method: str,
    costs: Sequence[BlockCost],
    sizes: Sequence[int],
    *,
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
    latency_s: float = DEFAULT_LATENCY,
    synthesizer_fraction: float = 0.0,
) -> list[StagePrediction]:
    """Compute and communication seconds per step of each stage of ``sizes`` (see the module doc).

    A stage's communication is the messages it sends: its output up (unless it is the last stage)
    and the δ of its input down (unless it is the first); both have the size of the block output at
    that cut. The labels sent to the last stage are small and ignored.
    """
    cls = _method_class(method)
    _check_link(bandwidth_bytes_per_s, latency_s, synthesizer_fraction)
    n = len(costs)
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ConfigError(f"sizes {list(sizes)} must be positive and sum to the {n} blocks")
    out: list[StagePrediction] = []
    start = 0
    for index, size in enumerate(sizes):
        end = start + size
        last = index == len(sizes) - 1
        compute = math.fsum(
            _block_compute(cls, c, last, synthesizer_fraction) for c in costs[start:end]
        )
        comm = 0.0
        if not last:
            comm += _message_s(costs[end - 1].output_bytes, bandwidth_bytes_per_s, latency_s)
        if index > 0:
            comm += _message_s(costs[start - 1].output_bytes, bandwidth_bytes_per_s, latency_s)
        out.append(StagePrediction(index, size, compute, comm))
        start = end
    return out


def predict_step_seconds(
    method: str,
    costs: Sequence[BlockCost],
    sizes: Sequence[int],
    *,
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
    latency_s: float = DEFAULT_LATENCY,
    synthesizer_fraction: float = 0.0,
) -> float:
    """Predicted steady-state seconds per training step of ``method`` on stages of ``sizes`` blocks.

    Decoupled methods (fr, ddg, dni) overlap their stages: the slowest stage sets the pace. A
    backward-locked one (bp's synchronous pipeline) runs every stage and message in turn: the sum.
    """
    stages = predict_stages(
        method,
        costs,
        sizes,
        bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        latency_s=latency_s,
        synthesizer_fraction=synthesizer_fraction,
    )
    return _step_s(_method_class(method), stages)


def _step_s(cls: type[PipelineMethod], stages: Sequence[StagePrediction]) -> float:
    if cls.backward_locked:
        return math.fsum(s.total_s for s in stages)  # nothing overlaps
    return max(s.total_s for s in stages)  # decoupled: the slowest stage sets the pace


def balanced_sizes(
    costs: Sequence[BlockCost],
    k: int,
    method: str,
    *,
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
    latency_s: float = DEFAULT_LATENCY,
    synthesizer_fraction: float = 0.0,
) -> list[int]:
    """Blocks per stage for ``k`` stages minimising ``method``'s predicted step time (exact DP).

    For decoupled methods (fr, ddg, dni) the slowest stage sets the pace, so this is
    :func:`~gradkit.stages.partition` with the method's per-block cost in the early stages (FR:
    ``2F + B``, the replay forward included), in the last stage (``F + B``), and each cut's message
    charged to both stages beside it. For a backward-locked method (bp) every split computes the
    same total, so the cut with the fewest bytes to send wins, and among those the one whose slowest
    stage is fastest (it is the least memory-hungry, too):
    :func:`~gradkit.stages.partition.fewest_bytes_partition`.
    """
    cls = _method_class(method)
    _check_link(bandwidth_bytes_per_s, latency_s, synthesizer_fraction)
    early = [_block_compute(cls, c, False, synthesizer_fraction) for c in costs]
    last = [_block_compute(cls, c, True, synthesizer_fraction) for c in costs]
    cuts = [_message_s(c.output_bytes, bandwidth_bytes_per_s, latency_s) for c in costs[:-1]]
    if cls.backward_locked:
        return fewest_bytes_partition(
            early,
            k,
            cut_bytes=[c.output_bytes for c in costs[:-1]],
            last_costs=last,
            cut_costs=cuts,
        )
    return partition(early, k, last_costs=last, cut_costs=cuts)


def _predict_k(
    costs: Sequence[BlockCost],
    k: int,
    method: str,
    single_process_s: float,
    bandwidth: float,
    latency: float,
    synthesizer_fraction: float,
) -> SplitPrediction:
    n = len(costs)
    if k == 1:
        # Not splitting means plain backprop in one process with every core: the baseline itself.
        only = StagePrediction(0, n, single_process_s, 0.0)
        return SplitPrediction(method, 1, (n,), (only,), single_process_s, 1.0)
    options = {
        "bandwidth_bytes_per_s": bandwidth,
        "latency_s": latency,
        "synthesizer_fraction": synthesizer_fraction,
    }
    sizes = balanced_sizes(costs, k, method, **options)
    stages = predict_stages(method, costs, sizes, **options)
    step = _step_s(_method_class(method), stages)
    speedup = single_process_s / step if step > 0 else math.inf
    return SplitPrediction(method, k, tuple(sizes), tuple(stages), step, speedup)


def _check_baseline(single_process_s: float) -> None:
    if not (single_process_s > 0 and math.isfinite(single_process_s)):
        raise ConfigError(
            f"single_process_s must be a positive number of seconds, got {single_process_s!r}; "
            "use backprop_seconds(profile_blocks(model, sample)) with all the cores"
        )


def choose_stages(
    costs: Sequence[BlockCost],
    workers: int,
    method: str,
    *,
    single_process_s: float,
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
    latency_s: float = DEFAULT_LATENCY,
    synthesizer_fraction: float = 0.0,
) -> AutoChoice:
    """The K in ``1..workers`` (blocks permitting) with the best predicted speed-up, and its split.

    K=1 is plain single-process backprop, predicted as ``single_process_s`` (speed-up 1.0); K >= 2
    uses :func:`balanced_sizes` and :func:`predict_step_seconds` on ``costs`` (profiled with one
    worker's threads). Ties go to the smaller K: fewer processes for the same speed.

    Raises:
        ConfigError: unknown method, ``workers < 1``, no blocks, or a bad baseline or link.
    """
    check_method(method)
    _check_link(bandwidth_bytes_per_s, latency_s, synthesizer_fraction)
    _check_baseline(single_process_s)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    if not costs:
        raise ConfigError("costs is empty; profile at least one block")
    candidates = tuple(
        _predict_k(
            costs,
            k,
            method,
            single_process_s,
            bandwidth_bytes_per_s,
            latency_s,
            synthesizer_fraction,
        )
        for k in range(1, min(workers, len(costs)) + 1)
    )
    best = candidates[0]
    for c in candidates[1:]:
        if c.speedup > best.speedup:
            best = c
    return AutoChoice(method, workers, single_process_s, best, candidates)


def predict_speedups(
    costs: Sequence[BlockCost],
    ks: Iterable[int] = range(2, 9),
    method: str = "fr",
    *,
    single_process_s: float | None = None,
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
    latency_s: float = DEFAULT_LATENCY,
    synthesizer_fraction: float = 0.0,
) -> list[SplitPrediction]:
    """Predictions for K devices for each K in ``ks`` that the blocks permit (``1 <= K <= blocks``).

    Every device is assumed as fast as the profiled one. The speed-up is over ``single_process_s``,
    by default :func:`backprop_seconds` of ``costs`` (backprop on one such device).
    """
    check_method(method)
    _check_link(bandwidth_bytes_per_s, latency_s, synthesizer_fraction)
    baseline = backprop_seconds(costs) if single_process_s is None else single_process_s
    _check_baseline(baseline)
    return [
        _predict_k(
            costs, k, method, baseline, bandwidth_bytes_per_s, latency_s, synthesizer_fraction
        )
        for k in ks
        if 1 <= k <= len(costs)
    ]
