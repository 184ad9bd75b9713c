"""Facts about the machine that llama.cpp's defaults need."""

from __future__ import annotations

import os
from pathlib import Path

_SYSFS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int] | None = None, sysfs: Path = _SYSFS_CPU) -> int:
    """Physical cores among the CPUs this process may run on.

    Compute-bound ggml threads gain nothing from a core's second hyper-thread and lose to
    the contention, so llama.cpp's own tools default to physical cores too.  Linux: CPUs
    sharing `topology/thread_siblings_list` are one core; elsewhere (or without sysfs) the
    logical count is the best answer available.
    """
    if cpus is None:
        cpus = (
            os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        )
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))
