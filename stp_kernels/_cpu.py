"""``cpu`` backend of ``masked_logprob``: the C++/OpenMP extension ``stp_kernels._C_cpu`` (BLAS for the tile
matmuls, fused online log-sum-exp and gradient in between). Interface: ``reference.backend_contract``."""

from __future__ import annotations

import torch  # noqa: F401  -- must be imported before the extension's shared object is loaded

_ext = None


def check() -> None:
    """Raise ImportError with the way out when the extension was not built."""
    global _ext
    if _ext is None:
        try:
            from . import _C_cpu
        except ImportError as exc:
            raise ImportError(f"the C++ extension stp_kernels._C_cpu is not built ({exc}); "
                              "reinstall with `pip install -e .`") from exc
        _ext = _C_cpu


def forward(h, w, vocab_ids, tgt, inv_temp: float, want_mean: bool):
    check()
    return _ext.masked_logprob_forward(h, w, vocab_ids, tgt, inv_temp, want_mean)


def backward(h, w, vocab_ids, tgt, inv_temp: float, lse, g_tgt, a, b, need_dh: bool, need_dw: bool):
    check()
    return _ext.masked_logprob_backward(h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, need_dh, need_dw)


def workspace_bytes(h, w, vocab_ids, tgt) -> int:
    check()
    return _ext.masked_logprob_workspace_bytes(h, w, vocab_ids, tgt)
