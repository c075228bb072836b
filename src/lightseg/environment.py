"""The environment variables lightseg reads, each parsed here, once and strictly.

Why: a switch read as ``value != "0"`` took ``LIGHTSEG_ACCEL=off`` for *on*, and
``OMP_NUM_THREADS=abc`` stopped the ONNX predictor with a traceback. A value that is not one of
the accepted spellings is now a :class:`~lightseg.errors.SettingError` naming the variable, its
value and what to set instead; the CLI checks them all (:func:`check`) before it starts any work.

* ``LIGHTSEG_ACCEL``, ``LIGHTSEG_NATIVE``, ``LIGHTSEG_REUSE_MEMORY``: switches, on unless set to
  ``0``, ``off``, ``false`` or ``no`` (``1``, ``on``, ``true``, ``yes`` turn them on; any case,
  an empty value is the default).
* ``OMP_NUM_THREADS``: read as the OpenMP runtime reads it, a positive whole number or a comma
  list of them (one per nesting level; lightseg's parallel work is the first level).

``LIGHTSEG_CACHE`` and ``CC`` belong to the kernel build, which falls back to PyTorch's ops
with a warning instead (:mod:`lightseg.accel.native_library`).
"""

from __future__ import annotations

import os

from lightseg.errors import SettingError

SWITCHES = {
    "LIGHTSEG_ACCEL": "the CPU accelerator: module swaps and fused kernels (docs/models.md)",
    "LIGHTSEG_NATIVE": "the accelerator's fused C kernels only",
    "LIGHTSEG_REUSE_MEMORY": "serving large blocks from the heap (lightseg.allocator)",
}
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def switch(name: str) -> bool:
    """Whether the switch ``name`` of :data:`SWITCHES` is on (the default when unset or empty)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in ("", *_ON):
        return True
    if value in _OFF:
        return False
    raise SettingError(f"{name}={raw!r} is not a switch ({SWITCHES[name]}); set it to 0 (or off, false, no) to "
                       f"turn it off, to 1 (or on, true, yes) or unset it to keep it on")


def omp_threads() -> int | None:
    """The thread count ``OMP_NUM_THREADS`` fixes (its first level), or ``None`` when unset or empty."""
    raw = os.environ.get("OMP_NUM_THREADS", "")
    if not raw.strip():
        return None
    first = raw.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise SettingError(f"OMP_NUM_THREADS={raw!r} is not a thread count; set it to a positive whole number "
                           "(e.g. OMP_NUM_THREADS=2), or unset it to let lightseg choose")
    return int(first)


def check() -> None:
    """Parse every variable this module reads; the first bad one raises :class:`SettingError`."""
    for name in SWITCHES:
        switch(name)
    omp_threads()
