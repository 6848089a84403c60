"""Typed options: a dataclass built from strings, YAML/JSON values or Python values.

``--set lr=1e-4`` arrives as text, ``--config file.yaml`` as YAML values, ``fewstep.distill(...,
lr=1e-4)`` as Python values. :func:`build` checks each against the dataclass field's type and
converts it (``"1e-4"`` -> ``1e-4`` for a float, ``"0.9,0.99"`` -> ``(0.9, 0.99)`` for a tuple); an
unknown key or a value of the wrong type is a one-line :class:`~fewstep.errors.FewstepError` that
names the valid keys. :func:`to_json` is the way back (``config.json`` of runs and students).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from fewstep.errors import FewstepError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith(("[", "(")) and text.endswith(("]", ")")):
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()]


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotation ``tp``; :class:`FewstepError` naming ``key`` if it
    cannot be. Strings (from the command line) are parsed; other values are checked."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = FewstepError(f"option {key} must be {_type_name(tp)}, got {value!r}")
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise bad
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, key)
            except FewstepError:
                continue
        raise bad
    if origin is typing.Literal:
        for a in args:
            if value == a or (isinstance(value, str) and not isinstance(a, str) and value == str(a)):
                return a
        raise FewstepError(f"option {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (tuple, list) or tp in (tuple, list):
        items = _split_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise FewstepError(f"option {key} needs {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(items, args, strict=True))
        inner = args[0] if args else Any
        out = [coerce(v, inner, key) for v in items]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def build(cls: type, options: dict[str, Any], what: str) -> Any:
    """An instance of dataclass ``cls`` from defaults plus ``options`` (typed; unknown keys are an
    error naming ``what`` and the valid keys)."""
    if not dataclasses.is_dataclass(cls):
        if options:
            raise FewstepError(f"{what} takes no options, got {', '.join(sorted(options))}")
        return cls() if cls is not object else None
    types_ = field_types(cls)
    unknown = sorted(set(options) - set(types_))
    if unknown:
        raise FewstepError(f"unknown option {unknown[0]!r} for {what}; valid options: {', '.join(types_)}")
    return cls(**{k: coerce(v, types_[k], f"{k} ({what})") for k, v in options.items()})


def to_json(obj: Any) -> Any:
    """A dataclass (or nested values) as JSON-compatible data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FewstepError(f"config value {obj!r} ({type(obj).__name__}) cannot be saved as JSON; use plain values")


def option_names(cls: type) -> set[str]:
    """The option names of a dataclass (none for a class without options)."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
