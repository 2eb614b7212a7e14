"""Training curves: loss against epochs and against wall-clock time (Features Replay paper, Fig. 4)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gradkit.errors import ConfigError, StorageError
from gradkit.runs import RunRecord, read_run

__all__ = ["plot_runs"]


def plot_runs(
    runs: Sequence[str | os.PathLike[str] | RunRecord],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plot train and test loss of several runs, against epochs and against training time.

    Args:
        runs: run folders (or records already read).
        out: PNG file to write.
        title: figure title; defaults to the model and dataset of the first run.

    Returns:
        The path of the PNG.

    Raises:
        ConfigError: matplotlib is not installed.
        DataError: a folder is not a run folder.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib; install it with: pip install 'gradkit[plot]'"
        ) from None

    out = _output_path(out, plt.gcf().canvas.get_supported_filetypes())
    plt.close("all")
    records = [r if isinstance(r, RunRecord) else read_run(r) for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, rec in enumerate(records):
        if not rec.history:
            continue
        color = f"C{i}"
        epochs = [h["epoch"] for h in rec.history]
        seconds = [h["elapsed_seconds"] for h in rec.history]
        # Train loss within epochs where recorded (about ten points per epoch), else per epoch.
        curve = [pt for h in rec.history for pt in h.get("train_curve") or []]
        if curve:
            train_x = ([pt[0] for pt in curve], [pt[1] for pt in curve])
            train_loss = [pt[2] for pt in curve]
        else:
            train_x, train_loss = (epochs, seconds), [h["train_loss"] for h in rec.history]
        for ax, xs, txs in ((axes[0], epochs, train_x[0]), (axes[1], seconds, train_x[1])):
            ax.plot(txs, train_loss, "-", color=color, alpha=0.9, label=f"{rec.label} train")
            ax.plot(xs, [h["test_loss"] for h in rec.history], "o--", color=color, label=f"{rec.label} test")
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training time (s)")
    for ax in axes:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title is None and records:
        cfg = records[0].config
        title = f"{cfg.get('model', '?')} on {cfg.get('data', '?')}"
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc.strerror or exc}; choose another -o") from None
    finally:
        plt.close(fig)
    return out


def _output_path(out: str | os.PathLike[str], formats: dict[str, str]) -> Path:
    """The file the plot goes to: an existing folder gets ``loss.png`` inside it (and the returned path
    says so); the extension must be one matplotlib writes. Checked before any run is read."""
    path = Path(out)
    if path.is_dir():
        path = path / "loss.png"
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(f".{k}" for k in sorted(formats))
        what = f"has the unknown extension .{suffix}" if suffix else "has no extension"
        raise ConfigError(f"-o {out} {what}; name a file ending in one of: {known} (e.g. loss.png)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise StorageError(f"cannot write {path}: {parent} is a file; choose another -o")
    return path
