"""Keep freed memory in the process for the next tensor instead of handing it back to the OS.

Why: glibc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and unmaps it on free, so every large activation costs one page fault per 4 KiB page plus the
kernel zeroing that page, on every forward. LightMedSeg's 1x4x128^3 forward took 600,000
minor faults and 1.8 s of system time beside 2.3-2.8 s of compute (1 thread); with mmap off and
the heap never trimmed, a forward after the first reuses the last one's memory: no faults, no
system time, and 1.7-1.9x less wall time on 2 threads (docs/benchmarks.md). ONNX Runtime keeps
its own arena, which is the same idea.

Cost: freed memory stays with the process until it exits, and reuse is not perfect, so the peak
resident size grows too (measured -1 to +16 % for LightMedSeg, +35 % for plainunet's forward).
glibc only (Linux); nothing changes elsewhere, with ``LIGHTSEG_REUSE_MEMORY=0``, or where the
user tunes malloc through ``MALLOC_*`` or ``GLIBC_TUNABLES``. :func:`release_free_memory`
hands the kept memory back, e.g. before measuring a peak.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from lightseg.environment import switch

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes (a C int): keep up to 2 GiB free


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the C library this interpreter runs on
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # musl and others: no such knobs
    return libc


def _opted_out() -> bool:
    if not switch("LIGHTSEG_REUSE_MEMORY"):
        return True
    return "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(key.startswith("MALLOC_") for key in os.environ)


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (once per process); True if applied."""
    libc = _glibc()
    if libc is None or _opted_out():
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``), so the next allocation shows in the RSS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
