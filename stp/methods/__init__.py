"""RL methods, one module each, found by name: every module of this package that defines ``METHOD`` (a subclass of
``stp.methods.base.Method``) registers it under ``METHOD.name``. Adding a method = adding its module (plus its
recipes in stp/recipes and its tests); nothing else lists methods, and its own configuration section lives in the
module too (``Method.sections``). Importing this package does not import torch, nor ``stp.config``."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method, RolloutSettings

__all__ = ["Method", "RolloutSettings", "METHODS", "get_method"]


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, Method) and cls.name):
            raise TypeError(f"{__name__}.{info.name}.METHOD must be a Method subclass with a name, got {cls!r}")
        if cls.name in found:
            raise TypeError(f"method name {cls.name!r} defined twice ({found[cls.name].__module__}, {cls.__module__})")
        found[cls.name] = cls
    # The GRPO family first, in the order the paper compares them.
    order = ("stp", "elbo", "d1")
    return {n: found[n] for n in sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))}


METHODS: dict[str, type[Method]] = _discover()


def get_method(name: str) -> type[Method]:
    """The method class named ``name`` (``ValueError`` naming the allowed ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"method {name!r}: allowed: {', '.join(METHODS)}")
    return METHODS[name]
