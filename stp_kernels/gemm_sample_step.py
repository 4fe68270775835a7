"""``gemm`` backend of ``sample_step``: library matmuls over vocabulary chunks with a fused sampling epilogue.

Contract (every sample_step backend):
    forward(h, w, vocab_ids, keys, inv_temp, greedy, want_mean) -> (slot, z_sel, lse, mean)
        score[r, v] = z[r, v] * inv_temp + gumbel(keys[r], token(v)) (greedy: score = z), z = h @ W[sel].T with
        float32 accumulation; gumbel = -log(-log(u)) with u = ((bits >> 9) + 0.5) * 2**-23 bit-identical to
        ``reference.counter_uniform``; slot = first argmax of score (ties to the lowest slot), z_sel = z[r, slot],
        lse = logsumexp_v z[r, v], mean = sum_v softmax(z)_v z_v (untempered), or None when want_mean is False.

Per chunk of ``_gemm_common.settings.chunk`` slots: z = h @ W[chunk].T (float32 output), then one epilogue pass
folds the chunk into the running argmax of the score (a later chunk replaces only on a strictly greater score) and
the online log-sum-exp and mean of the untempered z. 2 N H V flops; extra memory O(R * chunk). On CUDA the
epilogue of chunk c overlaps the matmul of chunk c + 1 (second stream). Deterministic: fixed chunk order, no atomics.

The torch epilogue's noise is bit-exact; the Triton epilogue draws it with the GPU's fast log2
(``reference.gumbel_fast``, within 1e-6 + 3e-7 |g| of it), which can only flip the argmax at near-ties. With
``want_tlse`` the epilogue also keeps sum exp((z - m) * inv_temp) on the running max m of z: the tempered
log-sum-exp, one exp more per logit.

Status: verified on CPU (torch epilogue, and the Triton epilogue through Triton's interpreter); the CUDA path has
not run on a GPU yet: ``python -m stp_kernels.acceptance`` measures it.
"""

from __future__ import annotations

import torch

from . import _gemm_common as G

__all__ = ["forward"]


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, keys: torch.Tensor, inv_temp: float,
            greedy: bool, want_mean: bool, want_tlse: bool = False):
    """(slot int64 [R], z_sel float32 [R], lse float32 [R], mean float32 [R] | None) and, with ``want_tlse``, the
    tempered log-sum-exp logsumexp_v(z * inv_temp) float32 [R] (not with greedy); see the module docstring."""
    rows, dev = h.shape[0], h.device
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    keys = keys.long().contiguous()
    best = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
    slot = torch.zeros(rows, dtype=torch.int64, device=dev)
    z_sel = torch.zeros(rows, dtype=torch.float32, device=dev)
    m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(rows, dtype=torch.float32, device=dev)
    sz = torch.zeros(rows, dtype=torch.float32, device=dev) if want_mean else None
    want_tlse = bool(want_tlse) and not greedy
    st = torch.zeros(rows, dtype=torch.float32, device=dev) if want_tlse else None
    epi = G.epilogue_module(dev)
    fold = epi.fold_sample if epi is not None else G.torch_fold_sample
    inv_temp, greedy = float(inv_temp), bool(greedy)
    G.fold_chunks(h, w, vocab_ids, vocab_size,
                  lambda z, start: fold(z, start, inv_temp, greedy, keys, vocab_ids, best, slot, z_sel, m, s, sz, st))
    lse = m + torch.log(s)
    out = slot, z_sel, lse, (sz / s if sz is not None else None)
    return out + (m * inv_temp + torch.log(st),) if want_tlse else out
