"""How many threads a CPU prediction runs: the cores other processes leave it, case by case.

Why: the network's work is split evenly over its threads and every parallel region waits for the
slowest, so a thread that shares its core with another busy process holds all the others back.
Beside one equally ranked busy process on 2 cores, LightMedSeg's 1x4x128^3 forward took 0.948 s
on 2 threads and 0.784 s on 1 (quiet: 0.423 s and 0.774 s; docs/benchmarks.md). Processes at a
lower priority (``nice`` above 0) yield their core, so their time counts as free.

How: ``/proc/stat``'s CPU times between two readings, the time this process itself used in that
interval counted as free (it was preprocessing the case, not competing with itself). The reading
before each case's sliding window covers the time since the last one (the case's reading and
preprocessing), so it costs no wait. Only where PyTorch's thread count was not chosen by the
user (``OMP_NUM_THREADS`` unset) and on Linux; elsewhere the count stays as it is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from lightseg.device import allowed_cpus, available_cpus
from lightseg.environment import omp_threads

STAT = Path("/proc/stat")
MIN_TICKS_PER_CPU = 5  # an interval shorter than this (in clock ticks per CPU) says too little


@dataclass(frozen=True)
class CpuTimes:
    """One reading: clock ticks all CPUs spent in total and free for us (idle, waiting on I/O,
    running niced processes), and this process's own CPU seconds."""

    total: int
    free: int
    own_seconds: float


def read_cpu_times(stat_text: str, own_seconds: float, cpus: Collection[int] | None = None) -> CpuTimes:
    """A :class:`CpuTimes` from the text of ``/proc/stat``: the ``cpuN`` lines of ``cpus`` (the CPUs
    this process may run on: a cluster job's few CPUs of a busy node), or the aggregate ``cpu`` line
    for ``None``. Fields: user, nice, system, idle, iowait, irq, softirq, steal; guest time is
    already in user and nice."""
    wanted = {"cpu"} if cpus is None else {f"cpu{n}" for n in cpus}
    total = free = 0
    for line in stat_text.splitlines():
        name, *values = line.split()[:9] or [""]
        if name in wanted:
            fields = [int(v) for v in values]
            total, free = total + sum(fields), free + fields[1] + fields[3] + fields[4]  # nice, idle, iowait
    return CpuTimes(total, free, own_seconds)


def free_cpus(before: CpuTimes, after: CpuTimes, cpus: int, ticks_per_second: float) -> int | None:
    """The CPUs (of ``cpus``, rounded, at least 1) that were free for this process between two
    readings, or ``None`` when the interval is too short to tell."""
    total = after.total - before.total
    if total <= 0 or total < MIN_TICKS_PER_CPU * cpus:
        return None
    own = (after.own_seconds - before.own_seconds) * ticks_per_second
    share = min(1.0, max(0.0, (after.free - before.free + own) / total))
    return max(1, round(share * cpus))


class FreeCpuMeter:
    """Call it to get the CPUs free for this process since the last call (or since it was made);
    ``None`` where ``/proc/stat`` cannot be read or the interval was too short."""

    def __init__(self) -> None:
        self.ticks_per_second = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.last = self._read()

    def _read(self) -> CpuTimes | None:
        try:
            return read_cpu_times(STAT.read_text(), time.process_time(), allowed_cpus())
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> int | None:
        now = self._read()
        if now is None or self.last is None:
            self.last = now
            return None
        found = free_cpus(self.last, now, available_cpus(), self.ticks_per_second)
        if found is not None:
            self.last = now
        return found


def adapts_threads() -> bool:
    """Whether prediction picks its thread count per case: unless ``OMP_NUM_THREADS`` fixes it."""
    return omp_threads() is None
