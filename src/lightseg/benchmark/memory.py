"""Peak memory of a stretch of work in this process: one model forward, or a whole training.

CPU: Python's ``tracemalloc`` does not see torch's allocations, so the peak resident set size
(``VmHWM``) is read from ``/proc/self/status`` after resetting it (writing 5 to
``/proc/self/clear_refs``) at the start. Where ``/proc`` is missing or cannot be written,
``resource.getrusage`` gives the never-reset peak instead. CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. The start collects
garbage first: tensors left in reference cycles by earlier work would otherwise be freed by a
collection in the middle of the measured stretch and hide its peak under the old resident size;
it also hands back the free memory :mod:`lightseg.allocator` keeps, which new allocations would
otherwise reuse without raising the resident size.
Used by
:mod:`lightseg.benchmark.profile` (per forward) and :mod:`lightseg.benchmark.runs` (per training).
"""

from __future__ import annotations

import gc
import resource
import sys

from lightseg.allocator import release_free_memory

_MB = 1024.0**2


def rss_kib() -> tuple[int, int] | None:
    """(current RSS, peak RSS) of this process in KiB from /proc, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError):
        return None


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) back to its current RSS; False where /proc cannot do it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _MB


def process_peak_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` (resettable, and not inherited from a parent), else ``ru_maxrss``."""
    rss = rss_kib()
    return rss[1] / 1024 if rss else _maxrss_mb()


def memory_start(device: str) -> float:
    """Reset the peak-memory counter and return the memory held now, in MB (RSS, or CUDA allocated)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / _MB
    release_free_memory()  # memory kept by lightseg.allocator would hide new allocations from the RSS
    rss = rss_kib() if reset_peak_rss() else None
    return rss[0] / 1024 if rss else _maxrss_mb()


def memory_peak(device: str, start: float) -> tuple[float, float]:
    """(peak above ``start``, absolute peak) in MB since :func:`memory_start` returned ``start``."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / _MB
    else:
        peak = process_peak_mb()
    return max(peak - start, 0.0), peak
