"""One short table from the JSON lines that ``make gpu-check``'s benchmarks wrote.

    python benchmarks/gpu/summary.py benchmarks/gpu/results

Rows: per activation mode, step-time and peak-memory ratios against exact (ResNet-56 at batch 256
and 1024 from ``compress.py``; the Transformer encoder from ``transformer.py``), then samples/s per
method (``methods.py``). Every ``*.jsonl`` in the folder is read; a record with a ``mode`` is an
activation-mode row (``time_ratio``: step time / exact's; ``peak_ratio``: exact's peak / the mode's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                record.setdefault("_file", path.name)
                rows.append(record)
    return rows


def ratio(value: Any) -> str:
    return f"{float(value):.2f}x" if isinstance(value, (int, float)) else "-"


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else "benchmarks/gpu/results")
    rows = load(folder)
    table: list[tuple[str, str, str, str]] = []
    for r in rows:
        if "mode" not in r:
            continue
        if r.get("benchmark") == "transformer":
            what = f"transformer {r['layers']}x{r['width']} b{r['batch_size']}"
        else:
            what = f"{r.get('model', 'resnet56')} b{r.get('batch_size', r.get('batch', '?'))}"
        time_r = r.get("time_ratio", r.get("step_time_ratio"))
        peak_r = r.get("peak_ratio", r.get("peak_memory_ratio"))
        table.append((what, str(r["mode"]), ratio(time_r), ratio(peak_r)))
    methods = [r for r in rows if r.get("benchmark") == "methods"]
    device = next((r.get("gpu") or r.get("device") for r in rows if r.get("gpu") or r.get("device")), "?")
    print(f"gpu-check summary ({device}); time: step time / exact's; peak: exact's peak / mode's")
    print(f"{'workload':<26} {'mode':<7} {'time':>7} {'peak':>7}")
    for what, mode, t, p in table:
        print(f"{what:<26} {mode:<7} {t:>7} {p:>7}")
    if not table:
        print("(no activation-mode results)")
    if methods:
        print(f"ResNet-20 samples/s ({methods[0]['data']}): "
              + ", ".join(f"{r['method']} {r['samples_per_second']:.0f}" for r in methods))
    else:
        print("(no methods results)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
