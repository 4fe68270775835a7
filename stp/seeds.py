"""Seeds derived from the run's seed and labels: independent, reproducible streams per purpose."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["derive_seed"]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and a tuple of labels/counters (SHA-256: independent streams per purpose)."""
    blob = json.dumps([int(seed), *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & 0x7FFFFFFF
