"""``cuda`` backend of ``masked_logprob``: hand-written CUDA kernels (csrc/cuda), compiled as ``stp_kernels._C_cuda``.

Forward: an online log-sum-exp over vocabulary tiles with per-split partials merged in a fixed order; backward:
logits recomputed in vocabulary chunks, dz rounded once to the input dtype, then dh (float32) and dw (written in
the weight's dtype) as two tensor-core products (bf16/fp16; SIMT fp32 for float32). Deterministic: no atomics,
bitwise identical results run to run. Interface: ``reference.backend_contract``.
"""

from __future__ import annotations

from types import ModuleType

import torch

_ext: ModuleType | None = None
_REBUILD = "STP_CUDA=1 pip install --no-build-isolation -e . on a machine with the CUDA toolkit"


def extension(entry_point: str) -> ModuleType:
    """The compiled ``stp_kernels._C_cuda``, checked to provide ``entry_point``; ImportError saying how to build it."""
    global _ext
    if _ext is None:
        try:
            from . import _C_cuda  # torch must be imported first: the extension links against libtorch
        except ImportError as exc:
            raise ImportError(f"stp_kernels._C_cuda is not built (stp_kernels was installed without CUDA): "
                              f"reinstall with {_REBUILD} (import error: {exc})") from exc
        _ext = _C_cuda
    if not hasattr(_ext, entry_point):
        raise ImportError(f"stp_kernels._C_cuda predates {entry_point}: rebuild it with {_REBUILD}")
    return _ext


def check() -> None:
    """Raise ImportError (with how to build it) when the compiled extension is missing."""
    extension("forward")


def _module() -> ModuleType:
    return extension("forward")


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
            want_mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    lse, tgt_logit, mean = _module().forward(h, w, vocab_ids, tgt, float(inv_temp), bool(want_mean))
    return lse, tgt_logit, mean


def backward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
             lse: torch.Tensor, g_tgt: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_dh: bool,
             need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dh, dw = _module().backward(h, w, vocab_ids, tgt, float(inv_temp), lse, g_tgt, a, b, bool(need_dh),
                                bool(need_dw))
    return dh, dw
