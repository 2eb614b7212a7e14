"""One short table from the JSON lines that ``make gpu-check``'s benchmarks wrote.

    python benchmarks/gpu/summary.py benchmarks/gpu/results

Rows: per activation mode, step-time and peak-memory ratios against exact (ResNet-56 at batch 256
and 1024 from ``compress.py``; the Transformer encoder from ``transformer.py``), then samples/s per
method (``methods.py``), then the language-model benchmark's validation loss against bp's of the
same seed (``benchmarks/language-model/run.py``: issue 14's targets). Every ``*.jsonl`` in the folder
is read; a record with a ``mode`` is an activation-mode row (``time_ratio``: step time / exact's;
``peak_ratio``: exact's peak / the mode's); one with ``bench: train`` a language-model row.
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
    language_model(rows)
    return 0


def language_model(rows: list[dict[str, Any]]) -> None:
    """Per run name, validation loss minus bp's of the same seed (and batch shape)."""
    runs = [r for r in rows if r.get("bench") == "train" and "val_loss" in r]
    bp = {(r.get("seed", 0), r.get("batch_size"), r.get("context")): r["val_loss"] for r in runs if r["name"] == "bp"}
    gaps: dict[str, dict[int, float]] = {}
    for r in runs:
        key = (r.get("seed", 0), r.get("batch_size"), r.get("context"))
        if r["name"] != "bp" and key in bp:
            gaps.setdefault(r["name"], {})[key[0]] = r["val_loss"] - bp[key]
    if not gaps:
        print("(no language-model results)")
        return
    seeds = sorted({s for by_seed in gaps.values() for s in by_seed})
    shape = next(f"{r.get('batch_size')}x{r.get('context')}" for r in runs)
    print(f"gpt on text ({shape}, {runs[0].get('steps')} steps): val loss - bp's, by seed "
          f"(bp: {', '.join(f'{v:.3f}' for _, v in sorted(bp.items()))})")
    print(f"{'run':<26} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds) + f" {'mean':>8}")
    for name, by_seed in gaps.items():
        cells = [f"{by_seed[s]:+8.3f}" if s in by_seed else f"{'-':>8}" for s in seeds]
        mean = sum(by_seed.values()) / len(by_seed)
        print(f"{name:<26} " + " ".join(cells) + f" {mean:+8.3f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
