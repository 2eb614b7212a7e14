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
from gradkit.errors import ConfigError, TrainingDiverged
from gradkit.methods import METHODS, method_options
from gradkit.run_folder import RunFolder
from gradkit.runs import format_bytes, format_table, read_run
from gradkit.training import train

__all__ = ["CompareRow", "DEFAULT_METHODS", "compare", "format_comparison"]

DEFAULT_METHODS = ("bp", "fr", "ddg", "dni", "ulr")
"""What ``compare`` trains when no methods are named: the library's methods and their baselines
(the perturbation peers and others are opt-in with ``--methods``; ``--methods all`` takes every one)."""

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
    status: str = "ok"
    """``ok``, or ``diverged at epoch E`` when the loss became NaN (the other methods still run)."""
    test_bpc: float | None = None
    """Bits per character of a language model (``next-token`` data), else None."""


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
        methods: names from ``METHODS``, each optionally with its own stage count (``"fr:2"``
            trains fr with K=2 whatever ``base.stages`` says); None means :data:`DEFAULT_METHODS`
            (those registered), ``["all"]`` every registered method.
        out: parent folder of the run folders and of ``compare.png``.
        dataset: an already loaded dataset.
        plot: write ``out/compare.png`` (needs matplotlib).

    Returns:
        One row per method and the plot's path (None when not plotted).
    """
    if not methods:
        names = [n for n in DEFAULT_METHODS if n in METHODS]
    elif list(methods) == ["all"]:
        names = METHODS.names()
    else:
        names = list(methods)
    specs = [_parse_spec(n, base.stages) for n in names]
    # Each method gets the options it takes, so `-o copies=32` can tune ulr next to fr.
    unused = set(base.method_options) - set().union(*(method_options(m) for m, _ in specs))
    if unused:
        raise ConfigError(f"no compared method takes option(s) {', '.join(sorted(unused))}; "
                          "see each method's options in the README")
    if len(set(names)) != len(names):
        raise ConfigError(f"each method may appear once in --methods, got {', '.join(names)}")
    out = Path(out)
    # Before any data loads; compare has no --resume, so the run folder's own "pass --resume" advice
    # would mislead.
    taken = [n for n in names if RunFolder(out / n.replace(":", "-k")).holds_run()]
    if taken:
        raise ConfigError(f"{out} already holds compared runs ({', '.join(taken)}); choose another --out "
                          "or remove those folders (compare always starts new runs)")
    if dataset is None:
        dataset = load_dataset(
            base.data, base.data_dir, download=base.download,
            limit_train=base.limit_train, limit_test=base.limit_test, seed=base.seed,
            options=base.data_options,
        )
    rows = []
    for name, (method, stages) in zip(names, specs, strict=True):
        folder = name.replace(":", "-k")
        options = {k: v for k, v in base.method_options.items() if k in method_options(method)}
        config = dataclasses.replace(base, method=method, stages=stages, out=str(out / folder),
                                     method_options=options)
        log.info("training %s", name)
        try:
            result = train(config, dataset=dataset)
        except TrainingDiverged as exc:
            log.warning("%s diverged: %s", name, exc)
            rows.append(_diverged_row(name, config.out_path, exc))
            continue
        rows.append(_row(name, result.history, config.out_path))
    plot_path = None
    finished = [r.run_dir for r in rows if r.status == "ok" and r.run_dir is not None]
    if plot and finished:
        from gradkit.plot import plot_runs

        plot_path = plot_runs([read_run(d) for d in finished], out / "compare.png")
    return rows, plot_path


def _parse_spec(spec: str, default_stages: int) -> tuple[str, int]:
    """``"fr:2"`` -> ("fr", 2); ``"bp"`` -> ("bp", default_stages)."""
    name, sep, k = spec.partition(":")
    METHODS.get(name)  # fails early, listing the valid names
    if not sep:
        return name, default_stages
    if not k.isdigit() or int(k) < 1:
        raise ConfigError(f"bad stage count in {spec!r}; write METHOD:K with K >= 1, e.g. fr:2")
    return name, int(k)


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
        test_bpc=final.get("test_bpc"),
    )


def _diverged_row(method: str, run_dir: Path | None, exc: TrainingDiverged) -> CompareRow:
    nan = float("nan")
    status = f"diverged at {exc.where}" if exc.where else "diverged"
    return CompareRow(method, nan, nan, nan, nan, None, run_dir, status=status)


def format_comparison(rows: Sequence[CompareRow]) -> str:
    """The comparison as a plain-text table: test accuracy, or for language models (rows with
    ``test_bpc``) the per-token test loss and bits per character."""
    text = any(r.test_bpc is not None for r in rows)
    return format_table(
        ["method", *(["test loss", "test bpc"] if text else ["test acc"]), "epoch time", "samples/s",
         "activation memory"],
        [
            [
                r.method,
                *([f"{r.test_loss:.4f}" if r.status == "ok" else r.status,
                   f"{r.test_bpc:.4f}" if r.status == "ok" and r.test_bpc is not None else "-"] if text
                  else [f"{r.test_acc:.4f}" if r.status == "ok" else r.status]),
                f"{r.epoch_seconds:.1f} s" if r.status == "ok" else "-",
                f"{r.samples_per_second:.0f}" if r.status == "ok" else "-",
                format_bytes(r.activation_bytes),
            ]
            for r in rows
        ],
    )
