"""Pure-torch references: the specification of every op, the test oracle and the CPU fallback.

``masked_logprob`` and its backends share one definition. For scored row ``r`` (a row of ``hidden``)
and vocabulary slot ``v`` (token id ``sel(v)``: ``vocab[v]`` when a vocabulary prior is given, else ``v``)::

    z[r, v]      = <h[r], W[sel(v)]> / temperature            (accumulated in float32 or better)
    lse[r]       = log sum_v exp(z[r, v])
    logp[r]      = z[r, tgt[r]] - lse[r]                       (tgt = target's slot in the vocabulary)
    entropy[r]   = lse[r] - sum_v softmax(z[r])_v * z[r, v]

Backends compute three per-row float32 quantities -- ``lse``, the target logit ``z[r, tgt]`` and the mean
logit ``sum_v p z`` -- and, in backward, take per-row coefficients that express every supported output's
gradient in one form (derivation in ``backend_contract`` below).
"""

from __future__ import annotations

import torch

__all__ = ["masked_logprob_reference", "backend_contract"]


def masked_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    vocab: torch.Tensor | None = None,
    temperature: float = 1.0,
    upcast: torch.dtype | None = torch.float64,
    return_lse: bool = False,
    return_entropy: bool = False,
):
    """Materialise every logit and take log-softmax: the oracle for all backends.

    ``upcast`` is the dtype the logits are computed in (``torch.float64`` for tests). ``None`` keeps the
    input dtype for the matmul and upcasts only the logits to float32 -- exactly what a naive training
    loop does (``(h @ W.T).float().log_softmax(-1).gather(...)``) and the error budget bf16 tests compare to.
    Returns float32 (or ``upcast`` when it is float64) tensors of shape [R].
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    if rows is not None:
        h = h.index_select(0, rows)
    w = weight if vocab is None else weight.index_select(0, vocab)
    t = targets if vocab is None else torch.searchsorted(vocab, targets)
    if upcast is None:
        logits = (h @ w.T).float()
    else:
        logits = h.to(upcast) @ w.to(upcast).T
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logprobs.gather(1, t[:, None])[:, 0].to(out_dtype)
    extras = []
    if return_lse:
        extras.append(torch.logsumexp(logits, dim=-1).to(out_dtype))
    if return_entropy:
        extras.append(-(logprobs.exp() * logprobs).sum(-1).to(out_dtype))
    return (logp, *extras) if extras else logp


def backend_contract() -> str:
    """The interface every ``masked_logprob`` backend implements (kept as text so it ships with the code).

    forward(h, w, vocab_ids, tgt, inv_temp, want_mean) -> (lse, tgt_logit, mean_logit | None)
        h [R, H] contiguous, dtype float32 / bfloat16 / float16; w [V, H] contiguous, same dtype;
        vocab_ids [Vs] int64 sorted unique ids or None (then Vs = V, slot v = token v);
        tgt [R] int64 slot in [0, Vs); inv_temp python float; want_mean: compute mean_logit.
        Outputs float32 [R]. Never materialises [R, Vs]: online log-sum-exp over vocabulary tiles.

    backward(h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, need_dh, need_dw) -> (dh | None, dw | None)
        g_tgt, a [R] float32; b [R] float32 or None (treated as zeros). With p = exp(z - lse):
            dz[r, v] = g_tgt[r] * [v == tgt[r]] + p[r, v] * (a[r] - b[r] * z[r, v])
            dh[r]    = inv_temp * sum_v dz[r, v] * w[sel(v)]          float32 [R, H]
            dw[v]    = inv_temp * sum_r dz[r, v] * h[r]               float32 [Vs, H] (slot order)
        Recomputes z tile by tile. For outputs logp = z_t - lse, lse and entropy = lse - sum_v p z with
        upstream gradients g_logp, g_lse, g_ent:
            d logp / dz_v = [v == t] - p_v;  d lse / dz_v = p_v;  d entropy / dz_v = p_v * (mean - z_v)
        so g_tgt = g_logp, a = g_lse - g_logp + g_ent * mean, b = g_ent.
    """
    return backend_contract.__doc__ or ""
