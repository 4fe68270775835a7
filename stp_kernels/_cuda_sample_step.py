"""``cuda`` backend of ``sample_step``: CUDA kernels (csrc/cuda/sample_step.{h,cu}) built into ``stp_kernels._C_cuda``.

A tiled LM-head product with the counter-based Gumbel noise computed in the kernel (bit-identical to
``reference.counter_uniform``), a running argmax (ties to the lowest slot) and an online log-sum-exp per row over
vocabulary tiles; per-split partials merged in a fixed order. Deterministic: no atomics, bitwise identical results
run to run. Interface: the contract in ``stp_kernels.torch_chunked_sample_step``.
"""

from __future__ import annotations

from types import ModuleType

import torch

_ext: ModuleType | None = None


def check() -> None:
    """Raise ImportError (with how to build it) when the compiled extension is missing or predates sample_step."""
    global _ext
    if _ext is not None:
        return
    try:
        from . import _C_cuda  # torch must be imported first: the extension links against libtorch
    except ImportError as exc:
        raise ImportError(
            "stp_kernels._C_cuda is not built (stp_kernels was installed without CUDA): reinstall with "
            "STP_CUDA=1 pip install --no-build-isolation -e . on a machine with the CUDA toolkit "
            f"(import error: {exc})"
        ) from exc
    if not hasattr(_C_cuda, "sample_step_forward"):
        raise ImportError(
            "stp_kernels._C_cuda was built before sample_step existed (no sample_step_forward): rebuild it with "
            "STP_CUDA=1 pip install --no-build-isolation -e ."
        )
    _ext = _C_cuda


def _module() -> ModuleType:
    check()
    assert _ext is not None
    return _ext


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, keys: torch.Tensor, inv_temp: float,
            greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot int64 [R], z_sel float32 [R], lse float32 [R]); see ``stp_kernels.torch_chunked_sample_step``."""
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    slot, z_sel, lse = _module().sample_step_forward(h.contiguous(), w.contiguous(), vocab_ids,
                                                     keys.long().contiguous(), float(inv_temp), bool(greedy))
    return slot, z_sel, lse
