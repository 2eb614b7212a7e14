"""Several methods side by side: same model, data, seed and budget; one table and one plot."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradkit.config import TrainConfig
from gradkit.data import Dataset, load_dataset
from gradkit.errors import ConfigError
from gradkit.loop import train
from gradkit.methods import METHODS
from gradkit.runs import format_bytes, format_table, read_run

__all__ = ["CompareRow", "compare", "format_comparison"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareRow:
    """One method's result in a comparison."""

    method: str
    test_acc: float
    test_loss: float
    epoch_seconds: float
    """Median training time of an epoch (evaluation excluded)."""
    samples_per_second: float
    """Median over epochs."""
    activation_bytes: int | None
    run_dir: Path | None


def compare(
    base: TrainConfig,
    methods: Sequence[str] | None = None,
    *,
    out: str | Path,
    dataset: Dataset | None = None,
    plot: bool = True,
) -> tuple[list[CompareRow], Path | None]:
    """Train every method in ``methods`` (default: all registered) on the same configuration.

    Each method gets its own run folder ``out/<method>``; the data is loaded once and shared.

    Args:
        base: the configuration every method uses (its ``method`` and ``out`` are replaced).
        methods: names from ``METHODS``; None means all registered methods.
        out: parent folder of the run folders and of ``compare.png``.
        dataset: an already loaded dataset.
        plot: write ``out/compare.png`` (needs matplotlib).

    Returns:
        One row per method and the plot's path (None when not plotted).
    """
    names = list(methods) if methods else METHODS.names()
    for name in names:
        METHODS.get(name)  # fails early, listing the valid names
    if len(set(names)) != len(names):
        raise ConfigError(f"each method may appear once in --methods, got {', '.join(names)}")
    out = Path(out)
    if dataset is None:
        dataset = load_dataset(
            base.data, base.data_dir, download=base.download,
            limit_train=base.limit_train, limit_test=base.limit_test, seed=base.seed,
        )
    rows = []
    for name in names:
        config = dataclasses.replace(base, method=name, out=str(out / name))
        log.info("training %s", name)
        result = train(config, dataset=dataset)
        rows.append(_row(name, result.history, config.out_path))
    plot_path = None
    if plot:
        from gradkit.plot import plot_runs

        plot_path = plot_runs([read_run(out / n) for n in names], out / "compare.png")
    return rows, plot_path


def _row(method: str, history: list[dict[str, Any]], run_dir: Path | None) -> CompareRow:
    final = history[-1]
    return CompareRow(
        method=method,
        test_acc=final["test_acc"],
        test_loss=final["test_loss"],
        epoch_seconds=statistics.median(h["epoch_seconds"] for h in history),
        samples_per_second=statistics.median(h["samples_per_second"] for h in history),
        activation_bytes=final.get("activation_bytes"),
        run_dir=run_dir,
    )


def format_comparison(rows: Sequence[CompareRow]) -> str:
    """The comparison as a plain-text table."""
    return format_table(
        ["method", "test acc", "epoch time", "samples/s", "activation memory"],
        [
            [
                r.method,
                f"{r.test_acc:.4f}",
                f"{r.epoch_seconds:.1f} s",
                f"{r.samples_per_second:.0f}",
                format_bytes(r.activation_bytes),
            ]
            for r in rows
        ],
    )
