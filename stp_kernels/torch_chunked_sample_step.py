"""``torch_chunked`` backend of ``sample_step``: vocabulary tiles in plain torch (portable fallback).

Contract (shared by every sample_step backend):
    forward(h, w, vocab_ids, keys, inv_temp, greedy, want_mean) -> (slot, z_sel, lse, mean)
        h [R, H], w [V, H] (float32 / bfloat16 / float16), vocab_ids [Vs] int64 or None, keys [R] int64 holding the
        per-row uint32 counter keys (``reference.row_keys``), inv_temp = 1 / temperature (ignored when greedy),
        want_mean: compute ``mean`` (otherwise it is None and costs nothing).
        score[r, v] = z[r, v] * inv_temp + gumbel(keys[r], token(v)) (greedy: score = z), z = h @ W[sel].T in fp32;
        slot = first argmax of score (ties go to the lowest slot), z_sel = z[r, slot], lse = logsumexp_v z[r, v],
        mean = sum_v softmax(z[r])_v * z[r, v] (the mean of the UNTEMPERED logits under their own softmax, over the
        prior-restricted vocabulary). Outputs: slot int64 [R]; z_sel, lse, mean float32 [R].
        Callers derive confidence = exp(z_sel - lse) and the predictive entropy = lse - mean.
        Never materialises [R, Vs].
    forward(..., want_mean, want_tlse=True) (not greedy) -> (slot, z_sel, lse, mean, tlse): also the tempered
        log-sum-exp tlse = logsumexp_v(z[r, v] * inv_temp), from the same pass (one more exp per logit), so callers
        get the log-prob of the drawn token under the distribution it was drawn from: z_sel * inv_temp - tlse.
"""

from __future__ import annotations

import torch

from .reference import counter_uniform

_BLOCK_ELEMS = 1 << 20  # [R, tile]: noise hashing makes a few int64 temporaries of this size


def forward(h, w, vocab_ids, keys, inv_temp: float, greedy: bool, want_mean: bool, want_tlse: bool = False):
    want_tlse = bool(want_tlse) and not greedy
    num_rows = h.shape[0]
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    tile = max(128, min(vocab_size, _BLOCK_ELEMS // max(num_rows, 1)))
    h32 = h.float()
    dev = h.device
    best = torch.full((num_rows,), float("-inf"), device=dev)
    slot = torch.zeros(num_rows, dtype=torch.long, device=dev)
    z_sel = torch.zeros(num_rows, device=dev)
    m = torch.full((num_rows,), float("-inf"), device=dev)
    s = torch.zeros(num_rows, device=dev)
    sz = torch.zeros(num_rows, device=dev) if want_mean else None
    st = torch.zeros(num_rows, device=dev) if want_tlse else None
    for start in range(0, vocab_size, tile):
        stop = min(start + tile, vocab_size)
        tokens = torch.arange(start, stop, device=dev) if vocab_ids is None else vocab_ids[start:stop]
        z = h32 @ w.index_select(0, tokens).float().T
        if greedy:
            score = z
        else:
            score = z * inv_temp - torch.log(-torch.log(counter_uniform(keys, tokens)))
        tmax, targ = score.max(dim=1)  # first maximal index within the tile
        better = tmax > best  # strict: an earlier tile keeps ties
        best = torch.where(better, tmax, best)
        slot = torch.where(better, targ + start, slot)
        z_sel = torch.where(better, z.gather(1, targ[:, None])[:, 0], z_sel)
        m_new = torch.maximum(m, z.amax(1))
        if st is not None:
            st = st * torch.exp((m - m_new) * inv_temp) + torch.exp((z - m_new[:, None]) * inv_temp).sum(1)
        scale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * scale + e.sum(1)
        if sz is not None:
            sz = sz * scale + (e * z).sum(1)
        m = m_new
    out = slot, z_sel, m + torch.log(s), (sz / s if sz is not None else None)
    return out + (m * inv_temp + torch.log(st),) if want_tlse else out
