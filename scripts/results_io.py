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


def merge_rows(out: str | Path, meta: dict, rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The rows of an earlier run at out.json that this run does not redo (same key), then this
    run's rows: a full run of hours can be done a few policies at a time.  Refuses to mix runs
    whose settings (meta) differ."""
    path = Path(out).with_suffix(".json")
    if not path.exists():
        return rows
    earlier = json.loads(path.read_text())
    differing = {k: (earlier.get(k), v) for k, v in meta.items() if earlier.get(k) != v}
    if differing:
        kept = path.with_suffix(".unmerged.json")  # an hour's run is not lost to a settings check
        kept.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        raise SystemExit(
            f"cannot merge into {path}: settings differ (earlier, now): {differing}; "
            f"this run's rows are in {kept}"
        )
    redone = {tuple(r[k] for k in key) for r in rows}
    return [r for r in earlier["rows"] if tuple(r[k] for k in key) not in redone] + rows
