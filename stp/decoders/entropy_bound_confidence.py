"""Entropy-bounded decoding in confidence order: the EB sampler's bound ``sum H - max H <= gamma`` on the prefix of
a block's masked positions sorted by the confidence of their draw (highest first) instead of by entropy. The EB
sampler's paper names both orders (an error proxy: entropy or confidence); DiFFPO's sampler is the entropy one
(``entropy_bound``). Same settings: ``gamma``, a float >= 0 or a [B] tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .entropy_bound import EntropyBound


@dataclass
class EntropyBoundConfidence(EntropyBound):
    """EB decoding, positions ordered by confidence (highest first)."""

    name = "entropy_bound_confidence"
    order: ClassVar[str] = "confidence"


DECODER = EntropyBoundConfidence
