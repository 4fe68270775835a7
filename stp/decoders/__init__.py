"""Decoding rules, one module each, found by name: every module of this package that defines ``DECODER`` (a
subclass of ``stp.decoders.base.Decoder``) registers it under ``DECODER.name``. Adding a decoder = adding its module
(plus its tests); the rollout loop (``stp.sampler.generate``) and ``--rollout.decoder`` find it by name.

``get(name, **settings)`` builds one; ``from_options`` maps the legacy keyword arguments of ``generate``
(``remasking``, ``confidence_threshold``, ``entropy_bound``, ``dream``) to a decoder."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Decoder, Draw, Step, top_k_commit

__all__ = ["Decoder", "Draw", "Step", "top_k_commit", "DECODERS", "get", "from_options"]


def _discover() -> dict[str, type[Decoder]]:
    found: dict[str, type[Decoder]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DECODER", None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, Decoder) and cls.name):
            raise TypeError(f"{__name__}.{info.name}.DECODER must be a Decoder subclass with a name, got {cls!r}")
        if cls.name in found:
            raise TypeError(f"decoder name {cls.name!r} defined twice ({found[cls.name].__module__}, "
                            f"{cls.__module__})")
        found[cls.name] = cls
    order = ("low_confidence", "random")  # LLaDA's two first, the default first
    return {n: found[n] for n in sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))}


DECODERS: dict[str, type[Decoder]] = _discover()


def get(name: str, **settings) -> Decoder:
    """The decoder ``name`` with its ``settings`` (``ValueError`` naming the allowed names otherwise)."""
    if name not in DECODERS:
        raise ValueError(f"decoder {name!r}: allowed: {', '.join(DECODERS)}")
    return DECODERS[name](**settings)


def from_options(fn: str, *, remasking: str = "low_confidence", confidence_threshold: float | None = None,
                 entropy_bound=None, dream=None) -> Decoder:
    """The decoder that ``generate``'s legacy keyword arguments select, with their combination rules checked."""
    if entropy_bound is not None:
        for name, value, off in (("dream", dream, None), ("confidence_threshold", confidence_threshold, None),
                                 ("remasking", remasking, "low_confidence")):
            if value != off:
                raise ValueError(f"{fn}: entropy_bound cannot be combined with {name}={value!r} (the entropy bound "
                                 f"chooses how many and which positions); allowed with entropy_bound: {off!r}")
        return get("entropy_bound", gamma=entropy_bound)
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"{fn}: remasking={remasking!r}; allowed: 'low_confidence', 'random'")
    if dream is not None:
        if remasking != "low_confidence":
            raise ValueError(f"{fn}: remasking={remasking!r} is LLaDA's option; with dream set, dream.alg chooses "
                             f"the positions (leave remasking='low_confidence')")
        if confidence_threshold is not None:
            raise ValueError(f"{fn}: confidence_threshold={confidence_threshold!r} cannot be combined with dream "
                             f"(Dream's schedule fixes the count per step); allowed with dream: None")
        return get("dream", options=dream)
    if confidence_threshold is not None:
        return get("confidence_threshold", threshold=confidence_threshold, random=remasking == "random")
    return get(remasking)
