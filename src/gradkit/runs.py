"""Reading run folders and formatting their results for people."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradkit.run_folder import RunFolder

__all__ = ["RunRecord", "read_run", "format_bytes", "format_table"]


@dataclass(frozen=True)
class RunRecord:
    """A finished or partial run as found on disk."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """A short name for legends and tables: the method, with its stage count when split."""
        method = self.config.get("method") or self.path.name
        stages = self.config.get("stages", 1)
        return f"{method} (K={stages})" if stages and stages > 1 else str(method)


def read_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read ``config.json`` and ``metrics.jsonl`` of a run folder.

    Raises:
        DataError: the folder is not a run folder or its metrics are unreadable.
    """
    folder = RunFolder(path)
    history = folder.read_metrics()
    return RunRecord(folder.path, folder.read_config() or {}, history)


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; None -> ``'-'``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.split()[0])
    except (ValueError, IndexError):
        return False
    return True
