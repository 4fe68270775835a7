"""``cuda`` backend of ``sample_step``: CUDA kernels (csrc/cuda/sample_step.{h,cu}) built into ``stp_kernels._C_cuda``.

A tiled LM-head product with the counter-based Gumbel noise computed in the kernel (bit-identical to
``reference.counter_uniform``), a running argmax (ties to the lowest slot) and an online log-sum-exp per row over
vocabulary tiles (plus the running sum of exp * z when the mean logit is asked for); per-split partials merged in a
fixed order. Deterministic: no atomics, bitwise identical results run to run. Interface: the contract in
``stp_kernels.torch_chunked_sample_step``.
"""

from __future__ import annotations

import torch

from ._cuda import extension


def check() -> None:
    """Raise ImportError (with how to build it) when the extension is missing or predates sample_step."""
    extension("sample_step_forward")


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, keys: torch.Tensor, inv_temp: float,
            greedy: bool, want_mean: bool, want_tlse: bool = False):
    """(slot int64 [R], z_sel, lse, mean | None float32 [R]) [+ (tlse,) with ``want_tlse``]; see
    ``stp_kernels.torch_chunked_sample_step``.

    The tempered log-sum-exp is not computed inside these kernels yet: with ``want_tlse`` it comes from a second pass
    over the head (the ``cuda`` masked_logprob forward at the same temperature, 2 N H V more flops), reported once
    as a slower path. The ``gemm`` backend (the CUDA default) and ``triton`` compute it in the sampling pass."""
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    ext = extension("sample_step_forward")
    slot, z_sel, lse, mean = ext.sample_step_forward(h.contiguous(), w.contiguous(), vocab_ids,
                                                     keys.long().contiguous(), float(inv_temp), bool(greedy),
                                                     bool(want_mean))
    if not (want_tlse and not greedy):
        return slot, z_sel, lse, mean
    from . import _backends, _cuda

    _backends.report_fallback("cuda", "cuda", "sample_step's tempered log-prob takes a second pass over the LM head "
                              "(the cuda masked_logprob forward); the gemm and triton backends fold it into the "
                              "sampling pass")
    tlse, _, _ = _cuda.forward(h.contiguous(), w.contiguous(), vocab_ids, slot, float(inv_temp), False)
    return slot, z_sel, lse, mean, tlse
