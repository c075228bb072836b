"""Check a JSON object against a dataclass's field types, naming the key that is wrong.

Files lightseg writes from a dataclass (``config.json``, a cached case's ``{case}.json``) are read
back through :func:`check_fields`, so a truncated, hand-edited or foreign file is one clear
error naming the file and the key, never a ``TypeError`` deep inside training or prediction.
Floats must be finite (JSON readers accept ``NaN`` and ``Infinity``). A field whose type is a
dataclass is a nested JSON object, checked the same way; :func:`build` then makes the dataclass
(lists become the tuples the fields declare).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from lightseg.errors import LightsegError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def matches(value: Any, hint: Any) -> bool:
    """Whether a parsed JSON ``value`` fits the type ``hint`` (tuples are JSON lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return all(matches(v, args[0] if args else Any) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and matches(v, args[1] if args else Any)
                                               for k, v in value.items())
    return True  # a type this checker does not know: left to the reader


def describe(hint: Any) -> str:
    """``tuple[int, int, int]`` -> ``a list of 3 integers`` and so on, for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(args[0]) if args else 'values'}"
    if origin is dict or hint is dict:
        return "an object"
    return str(hint)


def check_fields(cls: type, obj: Any, where: str, error: type[LightsegError]) -> None:
    """Raise ``error`` naming ``where`` and the key unless ``obj`` is an object whose keys are
    ``cls``'s fields (all required ones present) with values of the fields' types."""
    if not isinstance(obj, dict):
        raise error(f"{where}: must be a JSON object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; was it written by another lightseg version?")
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in obj:
            if required:
                raise error(f"{where}: key {name!r} is missing; the file is incomplete (was it edited or cut short?)")
            continue
        if dataclasses.is_dataclass(hints[name]):
            check_fields(hints[name], obj[name], f"{where}, section {name!r}", error)
        elif not matches(obj[name], hints[name]):
            raise error(f"{where}: key {name!r} must be {describe(hints[name])}, got {obj[name]!r:.80}")


def build(cls: type, obj: dict[str, Any]) -> Any:
    """``cls`` from a checked JSON object (:func:`check_fields`): nested dataclasses built, JSON
    lists turned into the tuples the fields declare (dicts are kept as they are)."""
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(value, hints[name]) for name, value in obj.items()})


def _convert(value: Any, hint: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build(hint, value)  # type: ignore[arg-type]
    if not isinstance(value, (list, tuple)):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next((a for a in args if typing.get_origin(a) in (tuple, list)), Any)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is not tuple:
        return value
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0]) for v in value)
    return tuple(_convert(v, a) for v, a in zip(value, args))
