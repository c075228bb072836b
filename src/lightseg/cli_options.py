"""Argparse types for ``lightseg`` options: each value is checked where it is parsed.

Every int or float option of every verb gets bounds from :data:`lightseg.bounds.NUMBER_BOUNDS` (finite, within
range), so a negative, NaN, infinite or huge value is one argparse line naming the option, never
a traceback later; every plain text option refuses an empty value (:func:`text`); the other types
check their own forms (a fold, a benchmark shape, an output).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from lightseg.bounds import Bounds, bounds_of, describe, within


def bounded(kind: type, bounds: Bounds) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``bounds`` (or not finite)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(kind, bounds)}, got {text!r}") from None
        if not within(value, bounds):
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
    """Give every plain int/float option of ``verb`` its bounds (:func:`lightseg.bounds.bounds_of`), and
    every plain text option (no type, no choices) the non-empty check of :func:`text`."""
    for action in parser._actions:
        if action.type in (int, float):
            action.type = bounded(action.type, bounds_of(action.dest, action.type, verb))
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
