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
            dw[v]    = inv_temp * sum_r dz[r, v] * h[r]               [Vs, H] (slot order), float32 or w's dtype
        Recomputes z tile by tile. dw may come back in float32 or already in w's dtype; a backend should write it
        in w's dtype directly (from a complete float32 sum, rounded once), so that no float32 [V, H] buffer exists
        (LLaDA's head: 2 GB) and the caller's cast is a no-op. For 16-bit inputs a backend may round dz once to the
        input dtype before the two products (as torch's own autograd does).
        For outputs logp = z_t - lse, lse and entropy = lse - sum_v p z with upstream gradients g_logp, g_lse, g_ent:
            d logp / dz_v = [v == t] - p_v;  d lse / dz_v = p_v;  d entropy / dz_v = p_v * (mean - z_v)
        so g_tgt = g_logp, a = g_lse - g_logp + g_ent * mean, b = g_ent.
    """
    return backend_contract.__doc__ or ""


# ------------------------------------------------------------------------------------------------ sample_step
#
# Counter-based noise: a pure function of integers, identical on every backend, device, batch layout and process.
# For seed s (int64), step t, row identity r (int64, e.g. sample_id * canvas_length + position) and token id v:
#     k      = mix32(s_lo ^ mix32(s_hi ^ mix32(t)))            per call (host)
#     key_r  = mix32(k ^ mix32(r_lo ^ mix32(r_hi)))             per row  (``row_keys``)
#     bits   = mix32(key_r ^ mix32(v))                          per (row, token), in the kernel
#     u      = ((bits >> 9) + 0.5) * 2**-23                     23 random bits, exact in float32 and strictly
#                                                               inside (0, 1): the extremes are 2**-24 and
#                                                               1 - 2**-24, so the Gumbel noise is always finite
#                                                               (within [-2.82, 16.64]). With 24 bits the top
#                                                               value (2**24 - 0.5) / 2**24 rounds to 1.0 in
#                                                               float32 and gives +inf noise: an arbitrary token
#                                                               wins with probability 2**-24 per (row, token).
#     gumbel = -log(-log(u))                                    float32
# mix32 is Wellons' "lowbias32" integer finaliser (bijective on 32 bits, bias ~0.17 permille).
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): split c in 16-bit halves so no int64 product overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32 on int64 tensors holding uint32 values (or on a Python int)."""
    if isinstance(x, int):
        x &= _MASK32
        x ^= x >> 16
        x = (x * _M1) & _MASK32
        x ^= x >> 15
        x = (x * _M2) & _MASK32
        return x ^ (x >> 16)
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def call_key(seed: int, step: int) -> int:
    """The per-call part of the counter: a uint32 from (seed, step)."""
    return mix32((seed & _MASK32) ^ mix32(((seed >> 32) & _MASK32) ^ mix32(step & _MASK32)))


def row_keys(seed: int, step: int, row_ids: torch.Tensor) -> torch.Tensor:
    """Per-row uint32 keys (as int64) from (seed, step, row identity)."""
    r = row_ids.long()
    return mix32(call_key(seed, step) ^ mix32((r & _MASK32) ^ mix32((r >> 32) & _MASK32)))


def counter_uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u[r, j] in (0, 1) (float32) for row keys [R] and token ids [T]: the noise every sample_step backend draws."""
    bits = mix32(keys[:, None] ^ mix32(token_ids.long())[None, :])
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_fast(u: torch.Tensor, log2=torch.log2) -> torch.Tensor:
    """The Triton kernels' Gumbel noise -log(-log(u)) in torch, for float32 u = (k + 0.5) 2**-23: only ``log2`` (the
    GPU's fast approximate one there; pass a perturbed one to test its error) and a series for -log(u) near u = 1,
    where an approximate log would lose every digit: w = 1 - u (exact), -log(u) = w + w^2/2 + ... + w^11/11 for
    w <= 1/4, else -log2(u) ln 2. Within ~1e-6 of ``-log(-log(u))``; the bounds stay [-2.8116, 16.6356]."""
    ln2 = 0.6931471805599453
    w = 1.0 - u  # exact for u >= 1/2, where it is used
    series = torch.full_like(u, 1.0 / 11.0)
    for n in range(10, 0, -1):
        series = series * w + 1.0 / n
    series = series * w
    e = torch.where(w <= 0.25, series, -log2(u) * ln2)
    return -log2(e) * ln2


def counter_gumbel(seed: int, step: int, row_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The float32 Gumbel noise [R, T] that ``sample_step`` adds for these rows and tokens (a "fixed noise tensor"
    for reference samplers and tests)."""
    u = counter_uniform(row_keys(seed, step, row_ids), token_ids)
    return -torch.log(-torch.log(u))


def sample_step_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    seed: int,
    step: int,
    rows: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    temperature: float = 0.0,
    vocab: torch.Tensor | None = None,
    upcast: torch.dtype = torch.float64,
    return_entropy: bool = False,
    return_tempered_logp: bool = False,
):
    """Materialise logits and noise: x0 = argmax_v (z_v / T + gumbel_v) (argmax z when T == 0), ties to the lowest
    id; confidence = softmax(z)[x0] from the untempered logits z = h @ W.T. Returns (x0 int64 [R], conf float32 [R])
    and, with ``return_entropy``, the predictive entropy float32 [R] of softmax(z) (untempered, over the vocabulary
    prior when one is given): lse(z) - sum_v softmax(z)_v z_v, computed in ``upcast``. With
    ``return_tempered_logp``, last: log softmax(z / T)[x0] float32 [R], the log-prob of the draw under the distribution
    it was drawn from (0 at T = 0: the greedy draw is deterministic)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if rows is not None:
        h = h.index_select(0, rows)
    ids = torch.arange(weight.shape[0], device=weight.device) if vocab is None else vocab
    z = h.to(upcast) @ weight.index_select(0, ids).to(upcast).T
    if temperature > 0:
        if row_ids is None:
            row_ids = rows if rows is not None else torch.arange(h.shape[0], device=h.device)
        # The float32 noise is added in float32 arithmetic, as the kernels do.
        score = z.float() / temperature + counter_gumbel(seed, step, row_ids, ids)
    else:
        score = z
    slot = score.argmax(dim=-1)
    p = torch.softmax(z, dim=-1)
    conf = p.gather(1, slot[:, None])[:, 0]
    out = (ids[slot], conf.float())
    if return_entropy:
        out += ((torch.logsumexp(z, dim=-1) - (p * z).sum(-1)).float(),)
    if return_tempered_logp:
        if temperature > 0:
            out += (torch.log_softmax(z / temperature, dim=-1).gather(1, slot[:, None])[:, 0].float(),)
        else:
            out += (torch.zeros(slot.shape, dtype=torch.float32, device=z.device),)
    return out
