"""What every benchmark shares: its options' common forms, progress and timestamped lines on
stderr, memory and timing, how results are written (bench/results/<name>.json with the
machine, date and settings, and <name>.csv of the rows) and the matplotlib figures (PNG)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from infmllm_gguf.system import current_rss_mb, peak_rss_mb

__all__ = [
    "FULL_N_CTX",
    "NAMES",
    "RESULTS",
    "Stopwatch",
    "add_out",
    "current_rss_mb",
    "grouped_bars",
    "log",
    "merge_rows",
    "odd_distance",
    "peak_rss_mb",
    "process_rss_mb",
    "progress",
    "pyplot",
    "save_figure",
    "write_csv",
    "write_results",
    "wrote",
]

RESULTS = Path(__file__).resolve().parent / "results"
FULL_N_CTX = 8192  # the default model's trained context: the longest a full-cache reference runs
# first names for facts told to the model ("the code of NAME is ..."), one word each
NAMES = """Alice Bruno Chen Dalia Emeka Farah Goran Hana Ivan Jun Kofi Lena Mateo Nadia Omar Priya
Quinn Rosa Sven Tomas Ursula Victor Wanda Xavier Yusuf Zora Arjun Bianca Carlos Dmitri Elena
Felix Greta Hugo Ingrid Jonas Kira Luca Maya Nikolai Olga Pablo Rania Stefan Tara Umar Vera
Walter Yara Zane Amir Beatrix Cyrus Daphne Elias Fiona Gideon Helga Isaac Julia Kenji Lorenzo
Mira Nils Oscar Petra Rafael Selma Theo Uma Viktor Wendy Yosef Zelda Anton Brigid Caspar Doris
Eamon Freya Gustav Hilda Igor Jasmine Klaus Leila Magnus Nora Otto Paloma Rupert Saskia Tobias
Ulrich Valeria Wilhelm Ximena Yvonne""".split()

# --- options -------------------------------------------------------------------------------


def add_out(parser: argparse.ArgumentParser, name: str, what: str = "results") -> None:
    """--out: where the results go, bench/results/<name> by default (suffixes added)."""
    parser.add_argument("--out", default=str(RESULTS / name), help=f"{what} (default: %(default)s)")


def odd_distance(value: str) -> int:
    """An argparse type: a distance in rounds from a question round (odd) back to a fact round
    (even), so an odd number >= 1."""
    d = int(value)
    if d % 2 == 0 or d < 1:
        raise argparse.ArgumentTypeError(
            f"{d}: distances must be odd (a question round looks back to a fact round)"
        )
    return d


# --- running -------------------------------------------------------------------------------


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    """A progress bar on stderr, so that stdout keeps only the results' lines."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def log(message: str) -> None:
    """A line on stdout with the time of day, flushed (for long runs read from a log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Stopwatch:
    """Seconds since it was started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def process_rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Another process's resident memory now, in MiB (NaN where /proc does not say); field
    VmHWM: its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- results -------------------------------------------------------------------------------


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def write_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """One line per row, the given columns (others left out)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_results(out: str | Path, meta: dict, rows: list[dict], columns: Sequence[str]) -> Path:
    """Write out.json (machine, date, meta and rows) and out.csv; returns out without a suffix
    (for the PNG next to them)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    out.with_suffix(".json").write_text(json.dumps({**stamp, **meta, "rows": rows}, indent=2))
    write_csv(out.with_suffix(".csv"), rows, columns)
    return out


def merge_rows(out: str | Path, meta: dict, rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The rows of an earlier run at out.json that this run does not redo (same key), then this
    run's rows: a full run of hours can be done a few configurations at a time.  Refuses to
    mix runs whose settings (meta) differ."""
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


def wrote(out: str | Path, *suffixes: str) -> None:
    """Say which files a run wrote: wrote(out, "json", "csv") prints `wrote OUT.json/.csv`."""
    print(f"wrote {out}" + "/".join(f".{s}" for s in suffixes))


# --- figures -------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); imported when a figure is
    drawn, so that a benchmark's other steps do not need matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def grouped_bars(ax: Any, bars: dict[str, Sequence[float]], ticks: Sequence[str]) -> None:
    """One group of bars per tick, one bar (and legend entry) per key of `bars`."""
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars.items()):
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(ticks)) + 0.4 - width / 2, list(ticks))
