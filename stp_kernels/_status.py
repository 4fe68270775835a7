"""What the dispatch point (``_backends``) and the backends share without importing each other: whether Triton can
run on a device, and the record of slower paths (``report_fallback``; ``backend_status`` lists them)."""

from __future__ import annotations

import os
import warnings

import torch


def _triton_env_ok(device: str) -> str | None:
    """Return None when triton kernels can run on ``device``, else the reason they cannot."""
    if device == "cuda":
        return None if torch.cuda.is_available() else "torch has no CUDA device"
    if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        # Must happen before triton is imported; triton reads it when kernels are decorated.
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "triton on CPU needs TRITON_INTERPRET=1 set before triton is imported"
    return None


# (backend, device type) -> what runs slower than the backend's fast path, and why (reported once each).
_fallbacks: dict[tuple[str, str], str] = {}


def report_fallback(name: str, device: str, what: str) -> None:
    """Record that backend ``name`` on ``device`` takes a slower path (``what`` says which and why): one warning per
    process and path, and ``backend_status`` lists it."""
    key = (name, device)
    if what in _fallbacks.get(key, ""):
        return
    _fallbacks[key] = f"{_fallbacks[key]}; {what}" if key in _fallbacks else what
    warnings.warn(f"stp_kernels: backend {name!r} on {device} runs a slower path: {what}", RuntimeWarning,
                  stacklevel=3)
