"""Facts about the machine that llama.cpp's defaults need, the process's allocator and its memory."""

from __future__ import annotations

import ctypes
import os
import resource
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


def return_large_blocks() -> bool:
    """Keep glibc serving blocks of 128 KiB and more with mmap, so that they go back to the
    system when freed; returns whether it applied (glibc only).

    By default glibc raises that threshold as such blocks are freed, after which they are
    carved from per-thread arenas that seldom shrink: a server whose request threads copy
    megabytes (a turn's state copy, every token's logits) then grows its resident memory with
    each thread.  Meant for a process of our own (`infmllm-gguf serve`), not for a library import.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def peak_rss_mb() -> float:
    """The most resident memory this process has held so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux's /proc; elsewhere its peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()
