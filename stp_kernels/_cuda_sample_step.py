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
            greedy: bool, want_mean: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(slot int64 [R], z_sel, lse, mean | None float32 [R]); see ``stp_kernels.torch_chunked_sample_step``."""
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    ext = extension("sample_step_forward")
    slot, z_sel, lse, mean = ext.sample_step_forward(h.contiguous(), w.contiguous(), vocab_ids,
                                                     keys.long().contiguous(), float(inv_temp), bool(greedy),
                                                     bool(want_mean))
    return slot, z_sel, lse, mean
