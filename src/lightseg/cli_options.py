"""Argparse types for ``lightseg`` options: each value is checked where it is parsed.

Every int or float option of every verb gets bounds from :data:`NUMBER_BOUNDS` (finite, within
range), so a negative, NaN, infinite or huge value is one argparse line naming the option, never
a traceback later; every plain text option refuses an empty value (:func:`text`); the other types
check their own forms (a fold, a benchmark shape, an output).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

Bounds = tuple[float, bool, float, bool]  # low, low allowed, high, high allowed
INT_BOUNDS: Bounds = (1, True, 2**31 - 1, True)  # every int option not listed below
FLOAT_BOUNDS: Bounds = (0.0, False, 1e6, True)  # every float option not listed below
#: Per option ("verb:dest" first, then "dest"). Every int or float option of every verb is
#: checked when it is parsed (finite, within these bounds), so a negative, NaN, infinite or huge
#: value is one argparse line naming the option, never a traceback later.
NUMBER_BOUNDS: dict[str, Bounds] = {
    "seed": (0, True, 2**32 - 1, True),  # NumPy's seed range
    "train:workers": (0, True, 256, True),  # 0 = load in the training process
    "workers": (1, True, 256, True),
    "threads": (1, True, 1024, True),
    "patch": (1, True, 1024, True),
    "size": (1, True, 1024, True),
    "channels": (1, True, 1024, True),
    "batch": (1, True, 4096, True),
    "max_batch": (1, True, 4096, True),
    "batch_tiles": (1, True, 4096, True),
    "demo:cases": (2, True, 10_000, True),  # a quarter, at least one, is held out
    "cases": (1, True, 10_000, True),
    "warmup": (0, True, 10**6, True),
    "channel_pruning_start_epoch": (0, True, 10**6, True),  # 0: prune before any training
    "num_folds": (2, True, 1000, True),  # a fold needs cases to train on and to validate on
    "spacing": (0.0, False, 1e4, True),
    "lr": (0.0, False, 100.0, True),
    "val_fraction": (0.0, True, 1.0, False),
    "step": (0.0, False, 1.0, True),
    "nsd_tolerance": (0.0, True, 1e4, True),
    "batch_memory": (0.0, False, 1e3, True),
}


def describe(kind: type, bounds: Bounds) -> str:
    low, low_ok, high, high_ok = bounds
    return (f"{'an integer' if kind is int else 'a finite number'} {'>=' if low_ok else '>'} {low:g} "
            f"and {'<=' if high_ok else '<'} {high:g}")


def bounded(kind: type, bounds: Bounds) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``bounds`` (or not finite)."""
    low, low_ok, high, high_ok = bounds

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(kind, bounds)}, got {text!r}") from None
        inside = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be {describe(kind, bounds)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    parse.bounds = bounds  # type: ignore[attr-defined]
    return parse


def text(value: str) -> str:
    """An argparse ``type`` for a plain text value (a path, a name, JSON): refuses an empty or blank
    one, which no option takes (an empty ``-o ""`` from an unset shell variable meant the current
    folder to pathlib and ended in a traceback)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {value!r} (an unset shell variable?)")
    return value


def check_options(verb: str, parser: argparse.ArgumentParser) -> None:
    """Give every plain int/float option of ``verb`` its bounds (see :data:`NUMBER_BOUNDS`), and
    every plain text option (no type, no choices) the non-empty check of :func:`text`."""
    for action in parser._actions:
        if action.type in (int, float):
            default = INT_BOUNDS if action.type is int else FLOAT_BOUNDS
            bounds = NUMBER_BOUNDS.get(f"{verb}:{action.dest}", NUMBER_BOUNDS.get(action.dest, default))
            action.type = bounded(action.type, bounds)
        elif action.type is None and action.choices is None and action.nargs != 0:
            action.type = text


def fold_arg(text: str) -> int | str:
    if text == "all" or (text.isdigit() and text.isascii()):
        return text if text == "all" else int(text)
    raise argparse.ArgumentTypeError(f"expected a fold number 0, 1, ... or 'all', got {text!r}")


def shape_arg(text: str) -> tuple[int, int, int, int]:
    channels, _, size = text.lower().partition("x")
    if not (channels.isdigit() and size.isdigit()):
        raise argparse.ArgumentTypeError(f"expected CHANNELSxSIZE such as 1x64, got {text!r}")
    if not (1 <= int(channels) <= 1024 and 1 <= int(size) <= 1024):
        raise argparse.ArgumentTypeError(f"channels and size must be 1..1024, got {text!r}")
    return (int(channels), int(size), int(size), int(size))


def output_arg(text: str) -> str:
    if not text.endswith((".png", ".md", ".json")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a .png (plot), .md (table) or .json (raw rows) path")
    return text
