"""``torch_chunked`` backend of ``masked_logprob``: vocabulary tiles in plain torch, online log-sum-exp.

Peak extra memory is one [R, tile] float32 block instead of [R, V]. It runs on any device torch runs on and
is the portable fallback when no compiled or Triton kernel is available. Interface: ``reference.backend_contract``.
"""

from __future__ import annotations

import torch

# A [R, tile] float32 block per step; 2**22 elements (16 MiB) keeps the matmul efficient on CPU and GPU alike.
_BLOCK_ELEMS = 1 << 22


def _tile(num_rows: int, vocab_size: int) -> int:
    return max(128, min(vocab_size, _BLOCK_ELEMS // max(num_rows, 1)))


def _weight_tile(w: torch.Tensor, vocab_ids: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    return w[start:stop] if vocab_ids is None else w.index_select(0, vocab_ids[start:stop])


def _logits(h32: torch.Tensor, w_tile: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return (h32 @ w_tile.float().T).mul_(inv_temp)


def forward(h, w, vocab_ids, tgt, inv_temp: float, want_mean: bool):
    num_rows = h.shape[0]
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    h32 = h.float()
    m = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(num_rows, dtype=torch.float32, device=h.device)
    sz = torch.zeros(num_rows, dtype=torch.float32, device=h.device) if want_mean else None
    tgt_logit = torch.empty(num_rows, dtype=torch.float32, device=h.device)
    tile = _tile(num_rows, vocab_size)
    for start in range(0, vocab_size, tile):
        stop = min(start + tile, vocab_size)
        z = _logits(h32, _weight_tile(w, vocab_ids, start, stop), inv_temp)
        m_new = torch.maximum(m, z.amax(1))
        scale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * scale + e.sum(1)
        if sz is not None:
            sz = sz * scale + (e * z).sum(1)
        m = m_new
        inside = (tgt >= start) & (tgt < stop)
        local = (tgt - start).clamp(0, stop - start - 1)
        tgt_logit = torch.where(inside, z.gather(1, local[:, None])[:, 0], tgt_logit)
    lse = m + torch.log(s)
    mean = sz / s if sz is not None else None
    return lse, tgt_logit, mean


def backward(h, w, vocab_ids, tgt, inv_temp: float, lse, g_tgt, a, b, need_dh: bool, need_dw: bool):
    num_rows, hidden_size = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    h32 = h.float()
    dh = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.empty(vocab_size, hidden_size, dtype=torch.float32, device=h.device) if need_dw else None
    tile = _tile(num_rows, vocab_size)
    for start in range(0, vocab_size, tile):
        stop = min(start + tile, vocab_size)
        w_tile = _weight_tile(w, vocab_ids, start, stop).float()
        z = _logits(h32, w_tile, inv_temp)
        coef = a[:, None] if b is None else a[:, None] - b[:, None] * z
        dz = torch.exp(z - lse[:, None]).mul_(coef)
        inside = (tgt >= start) & (tgt < stop)
        # Target term at the rows whose target is in this tile; fixed shapes, no boolean indexing (no host sync).
        local = (tgt - start).clamp(0, stop - start - 1)[:, None]
        dz.scatter_add_(1, local, torch.where(inside, g_tgt, torch.zeros_like(g_tgt))[:, None])
        dz.mul_(inv_temp)
        if dh is not None:
            dh.addmm_(dz, w_tile)
        if dw is not None:
            torch.mm(dz.T, h32, out=dw[start:stop])
    return dh, dw
