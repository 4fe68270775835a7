"""``torch_chunked`` backend of ``masked_logprob``: vocabulary tiles in plain torch, online log-sum-exp.

Peak extra memory is one [R, tile] float32 block instead of [R, V]. It runs on any device torch runs on and
is the portable fallback when no compiled or Triton kernel is available. Interface: ``reference.backend_contract``.

Numerics by device. CUDA with bf16 / fp16 inputs: the matmuls stay in the input dtype on tensor cores with float32
output (``torch.mm(..., out_dtype=torch.float32)``; inputs are never upcast, which would forfeit tensor cores), dz
is rounded once to the input dtype for the two gradient products (as torch's own autograd does), dh accumulates in
float32 and each dw tile is written in the weight's dtype. Elsewhere (CPU, float32, or a torch without
``out_dtype``) every matmul runs in float32 and only the dw tiles are cast to the weight's dtype as they are written.
Either way dw comes back in the weight's dtype and no float32 [V, H] buffer exists.
"""

from __future__ import annotations

import functools

import torch

# A [R, tile] float32 block per step; 2**22 elements (16 MiB) keeps the matmul efficient on CPU and GPU alike.
_BLOCK_ELEMS = 1 << 22


def _tile(num_rows: int, vocab_size: int) -> int:
    return max(128, min(vocab_size, _BLOCK_ELEMS // max(num_rows, 1)))


def _weight_tile(w: torch.Tensor, vocab_ids: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    return w[start:stop] if vocab_ids is None else w.index_select(0, vocab_ids[start:stop])


@functools.cache
def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can multiply ``dtype`` matrices on ``device`` into a float32 result directly."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _lowp_cuda(x: torch.Tensor) -> bool:
    """16-bit CUDA tensors take the tensor-core path (input-dtype matmuls, float32 outputs)."""
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
            and _mm_out_dtype_works(x.device, x.dtype))


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 a @ b: in the inputs' dtype with float32 output on the tensor-core path, else upcast to float32."""
    if a.dtype == b.dtype and _lowp_cuda(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def forward(h, w, vocab_ids, tgt, inv_temp: float, want_mean: bool):
    num_rows = h.shape[0]
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    h_op = h if _lowp_cuda(h) else h.float()
    m = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(num_rows, dtype=torch.float32, device=h.device)
    sz = torch.zeros(num_rows, dtype=torch.float32, device=h.device) if want_mean else None
    tgt_logit = torch.empty(num_rows, dtype=torch.float32, device=h.device)
    tile = _tile(num_rows, vocab_size)
    for start in range(0, vocab_size, tile):
        stop = min(start + tile, vocab_size)
        z = _mm32(h_op, _weight_tile(w, vocab_ids, start, stop).T).mul_(inv_temp)
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
    lowp = _lowp_cuda(h)
    h_op = h if lowp else h.float()
    dh = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.empty(vocab_size, hidden_size, dtype=w.dtype, device=h.device) if need_dw else None
    tile = _tile(num_rows, vocab_size)
    for start in range(0, vocab_size, tile):
        stop = min(start + tile, vocab_size)
        w_tile = _weight_tile(w, vocab_ids, start, stop)
        w_op = w_tile if lowp else w_tile.float()
        z = _mm32(h_op, w_op.T).mul_(inv_temp)
        coef = a[:, None] if b is None else a[:, None] - b[:, None] * z
        dz = torch.exp(z - lse[:, None]).mul_(coef)
        inside = (tgt >= start) & (tgt < stop)
        # Target term at the rows whose target is in this tile; fixed shapes, no boolean indexing (no host sync).
        local = (tgt - start).clamp(0, stop - start - 1)[:, None]
        dz.scatter_add_(1, local, torch.where(inside, g_tgt, torch.zeros_like(g_tgt))[:, None])
        dz.mul_(inv_temp)
        if lowp:
            dz = dz.to(h.dtype)  # one rounding, as torch's autograd casts the logits' gradient
        if dh is not None:
            if lowp:
                dh.add_(torch.mm(dz, w_op, out_dtype=torch.float32))
            else:
                dh.addmm_(dz, w_op)
        if dw is not None:
            if dz.dtype == dw.dtype:
                torch.mm(dz.T, h_op, out=dw[start:stop])  # float32 accumulation inside, one rounding at the end
            else:
                dw[start:stop] = dz.T @ h_op  # float32 tile, cast as it is written
    return dh, dw
