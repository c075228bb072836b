"""Lazy package attributes (PEP 562): a package lists ``{name: module}`` and imports on first use.

``import lightseg`` stays fast and torch-free this way (an ONNX-only deployment predicts without
torch), and ``lightseg.inference`` can hold the torch predictor beside the torch-free ONNX one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``names[name]`` when ``name`` is first read."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
