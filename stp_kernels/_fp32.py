"""float32 semantics of the ops: exact float32 products inside every op, whatever the process-wide TF32 setting.

A training script commonly turns TF32 on for its own float32 matmuls (``torch.backends.cuda.matmul.allow_tf32 =
True``, ``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``).
cuBLAS then rounds float32 operands to a 10-bit mantissa (relative error ~5e-4 per operand), which at LLaDA's head
moves a log-prob by ~1e-2 nats. A user of a log-prob op with float32 inputs expects float32 results, so every op
runs its library matmuls under ``exact_fp32()``: the setting is switched to IEEE float32 for the op's duration and
restored afterwards (also when the op raises). 16-bit inputs are unaffected (their products accumulate in float32
either way).

torch has two APIs for this setting and raises when a process mixes them (reading the legacy flag after the new one
was set, or the reverse). ``exact_fp32`` therefore writes through the API the process already uses: the legacy flag
(``torch.get_float32_matmul_precision``) when it can be read, else the new ``fp32_precision`` property; it never
touches the setting when TF32 is off.
"""

from __future__ import annotations

import contextlib

import torch

_REDUCED = ("tf32", "bf16")


def _cuda_matmul_precision() -> str:
    """The effective float32 precision of CUDA matmuls: 'ieee', 'tf32' (or 'none' on torch without the new API)."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:
        return getter("cuda", "matmul")
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@contextlib.contextmanager
def exact_fp32():
    """IEEE float32 CUDA matmuls inside the block; the caller's setting (and API) restored on exit."""
    if _cuda_matmul_precision() not in _REDUCED:
        yield
        return
    try:
        legacy = torch.get_float32_matmul_precision()  # raises when the process set the new API
    except RuntimeError:
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    before = torch._C._get_fp32_precision_getter("cuda", "matmul")
    torch._C._set_fp32_precision_setter("cuda", "matmul", "ieee")
    try:
        yield
    finally:
        torch._C._set_fp32_precision_setter("cuda", "matmul", before)
