"""How every benchmark script writes its results: bench/results/<name>.json (machine, date,
settings, rows) and <name>.csv (one line per row, the columns asked for)."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def write_results(out: str | Path, meta: dict, rows: list[dict], columns: list[str]) -> Path:
    """Write out.json and out.csv; returns out without a suffix (for the PNG next to them)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    out.with_suffix(".json").write_text(json.dumps({**stamp, **meta, "rows": rows}, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out
