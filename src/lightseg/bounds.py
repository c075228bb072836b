"""The numeric bounds of options: one table for the CLI's parser and for training configurations
(``train`` from the CLI or the Python API, ``--config`` files, recipes, a run's ``config.json``).

A value outside its bounds (negative, zero where that means nothing, NaN, infinite, huge) is
refused where it is first read, naming the option, never a traceback later. Keys are option
names (a flag's dest, a training option); ``"verb:dest"`` entries are one verb's own.
"""

from __future__ import annotations

import math

Bounds = tuple[float, bool, float, bool]  # low, low allowed, high, high allowed
INT_BOUNDS: Bounds = (1, True, 2**31 - 1, True)  # every int option not listed below
FLOAT_BOUNDS: Bounds = (0.0, False, 1e6, True)  # every float option not listed below
NUMBER_BOUNDS: dict[str, Bounds] = {
    "seed": (0, True, 2**32 - 1, True),  # NumPy's seed range
    "train:workers": (0, True, 256, True),  # 0 = load in the training process
    "workers": (1, True, 256, True),
    "threads": (1, True, 1024, True),
    "patch": (1, True, 1024, True),
    "patch_size": (1, True, 1024, True),
    "size": (1, True, 1024, True),
    "channels": (1, True, 1024, True),
    "batch": (1, True, 4096, True),
    "batch_size": (1, True, 4096, True),
    "max_batch": (1, True, 4096, True),
    "batch_tiles": (1, True, 4096, True),
    "demo:cases": (2, True, 10_000, True),  # a quarter, at least one, is held out
    "cases": (1, True, 10_000, True),
    "warmup": (0, True, 10**6, True),
    "warmup_epochs": (0, True, 10**6, True),
    "channel_pruning_start_epoch": (0, True, 10**6, True),  # 0: prune before any training
    "num_folds": (2, True, 1000, True),  # a fold needs cases to train on and to validate on
    "spacing": (0.0, False, 1e4, True),
    "lr": (0.0, False, 100.0, True),
    "min_lr": (0.0, True, 100.0, True),
    "weight_decay": (0.0, True, 1e6, True),
    "momentum": (0.0, True, 1.0, False),
    "grad_clip": (0.0, True, 1e6, True),  # 0: no clipping
    "oversample_foreground": (0.0, True, 1.0, True),
    "val_fraction": (0.0, True, 1.0, False),
    "step": (0.0, False, 1.0, True),
    "nsd_tolerance": (0.0, True, 1e4, True),
    "batch_memory": (0.0, False, 1e3, True),
    "pruning_tolerance": (0.0, True, math.inf, True),  # any finite loss change
    "pruning_deadline": (0.0, False, 1.0, True),  # a fraction of the epochs
    "channel_pruning_initial_dropout": (0.0, True, 1.0, False),
    "channel_pruning_max_dropout": (0.0, True, 1.0, False),
}


def bounds_of(name: str, kind: type, verb: str = "") -> Bounds:
    """The bounds of option ``name`` (of ``verb``, whose own entry comes first) of type ``kind``."""
    default = INT_BOUNDS if kind is int else FLOAT_BOUNDS
    return NUMBER_BOUNDS.get(f"{verb}:{name}", NUMBER_BOUNDS.get(name, default))


def within(value: float, bounds: Bounds) -> bool:
    low, low_ok, high, high_ok = bounds
    inside = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
    return math.isfinite(value) and inside


def describe(kind: type, bounds: Bounds) -> str:
    low, low_ok, high, high_ok = bounds
    shown = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
    upper = "" if math.isinf(high) else f" and {'<=' if high_ok else '<'} {shown(high)}"
    return f"{'an integer' if kind is int else 'a finite number'} {'>=' if low_ok else '>'} {shown(low)}{upper}"
