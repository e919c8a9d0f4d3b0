"""Plain values (TOML, JSON, ``--set`` overrides) to section dataclasses and back.

Generic over the sections: every key is checked against the dataclass's annotations, so
an unknown key or a value of the wrong type raises :class:`ScenarioError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin

from privfl.config.errors import ScenarioError, _fail


def _to_plain(obj: Any) -> Any:
    if hasattr(obj, "to_table"):
        return obj.to_table()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _copy_plain(obj: Any) -> Any:
    """A copy of a plain form that shares no dict or list with it (the leaves are
    immutable scalars)."""
    if isinstance(obj, dict):
        return {k: _copy_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(key, f"must be a table, got {type(value).__name__}")
        if hasattr(tp, "from_table"):  # a section with free-form keys ([strategy])
            return tp.from_table(value, key)
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            _fail(key, f"must be {_describe(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(key, f"must be {_describe(tp)}, got {value!r}")
        (inner, *_) = get_args(tp)
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}")
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be a boolean (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            _fail(key, f"unknown key; accepted keys here: {', '.join(names)}")
        kwargs[k] = _coerce(hints[k], v, key)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> None:
    """Apply ``section.key=value`` strings to a raw scenario dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        path = path.strip()
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise ScenarioError(f"override {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # bare words such as dirichlet or /data/mnist
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"override {item!r}: {p} is not a table")
        node[parts[-1]] = value
