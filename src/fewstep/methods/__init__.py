"""Distillation methods, one module each, registered by name.

Every module in this package that defines a :class:`~fewstep.methods.base.Method` subclass with a
``name`` decorated by :func:`register` is importable as ``get_method(name)``. Modules are found
automatically, so adding a method touches only its own file.
"""

from __future__ import annotations

import importlib
import pkgutil

from fewstep.errors import FewstepError
from fewstep.methods.base import Batch, EMASpec, Method, OptimizerSpec, describe

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def available() -> dict[str, type[Method]]:
    """All registered methods, by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``, with a one-line error listing the valid ones."""
    methods = available()
    if name not in methods:
        raise FewstepError(f"unknown method {name!r}; run `fewstep methods` to list them ({', '.join(methods)})")
    return methods[name]


__all__ = ["Batch", "EMASpec", "Method", "OptimizerSpec", "available", "describe", "get_method", "register"]
