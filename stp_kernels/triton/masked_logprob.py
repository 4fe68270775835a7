"""``triton`` backend of ``masked_logprob``: tiled LM head + online log-sum-exp, deterministic backward.

Interface: ``reference.backend_contract`` (``forward`` / ``backward`` below), the same as ``torch_chunked``.
Layers, as in Liger-Kernel's ops: private ``@triton.jit`` kernels, plain launchers (``_launch_*``), the two public
functions. The autograd Function lives in ``stp_kernels.masked_logprob`` and is shared by every backend.

Notation: ``R`` scored rows, ``H`` hidden size, ``Vs`` vocabulary slots (``len(vocab_ids)`` or ``V``),
``sel(v)`` = ``vocab_ids[v]`` (or ``v``): the weight row of slot ``v``, gathered inside the kernels.

Kernels and cost (flops, in multiples of R*H*Vs):
  forward   grid (row tiles, vocab splits): z tile by tile, running max / sum / sum p*z, target logit picked up
            in passing; one fp32 partial (m, s, sz, z_tgt) per split, merged by ``_merge_kernel`` in split order.
            2 R*H*Vs flops; [R, Vs] is never written. Splits fill the GPU (2 programs per SM): with R = 2048 and
            BLOCK_R = 128 there are only 16 row tiles for 132 SMs.
  backward  per vocabulary chunk (in chunk order): ``_dz_kernel`` recomputes z (2) and writes dz, rounded once to
            the input dtype, to a [R, chunk] buffer; ``_dh_kernel`` dh (+)= dz @ W[chunk] (2, float32 dh);
            ``_dw_kernel`` dw[chunk] = dz^T @ h (2), written in the weight's dtype. 6 R*H*Vs flops with both
            gradients, 4 with one; no atomics, every output element has one writer per launch: two identical
            calls are bit-identical.

Numerics: fp32 accumulation (``tl.dot`` accumulates in fp32 for bf16/fp16 operands; fp32 operands use
``input_precision="ieee"``, not TF32, whose 10-bit mantissa would cost ~1e-3 relative); exp/log in fp32; int64
pointer offsets (V*H = 126464*4096 > 2**31).

Status: verified against float64 under the interpreter only (fp32 errors ~1e-5, bf16 within torch's own bf16
error); GPU compilation, launch settings and speed on H100/H200 are not yet measured.

Interpreter (``TRITON_INTERPRET=1``, CPU machines): ``tl.dot`` on bf16/fp16 operands returns garbage there, so
``UPCAST_DOT`` converts operands to fp32 first (the values are the same, so results match GPU numerics up to
summation order), and block sizes are small so ragged edges and vocabulary/row splits are exercised by tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETER_CONFIG, Config, interpreting, logits_tile, precision, slot_tokens, split

__all__ = ["check", "forward", "backward"]


def check() -> None:
    """Raise when these kernels cannot run here (importing this module already needs triton)."""
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError("no CUDA device and TRITON_INTERPRET != '1' (it must be set before triton is imported)")


# ----------------------------------------------------------------------------------------------------------------
# Forward: online log-sum-exp over the vocabulary tiles of one split
# ----------------------------------------------------------------------------------------------------------------
# Per row and split, after each tile with logits z_j:  m' = max(m, max_j z_j),  s' = s e^{m - m'} + sum_j e^{z_j - m'},
# sz' = sz e^{m - m'} + sum_j e^{z_j - m'} z_j. Then lse = m + log s and mean = sum_v p_v z_v = sz / s.
# Splits merge the same way with M = max_i m_i (``_merge_kernel``).


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, vocab_ptr, tgt_ptr, m_ptr, s_ptr, sz_ptr, zt_ptr,
                R, Vs, H, inv_temp, V_PER_SPLIT,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_VOCAB: tl.constexpr, WANT_MEAN: tl.constexpr, UPCAST_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_r = tl.program_id(0)  # row tiles vary fastest, so concurrent programs share the split's weight tiles in L2
    pid_s = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h_rows = offs_r.to(tl.int64) * H
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)

    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_R,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_stop = tl.minimum(v_start + V_PER_SPLIT, Vs)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        w_rows = slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB) * H
        z = logits_tile(h_ptr, w_ptr, h_rows, w_rows, mask_r, mask_v, H, inv_temp,
                        BLOCK_R, BLOCK_V, BLOCK_H, UPCAST_DOT, PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has at least one column inside the split
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 in masked columns (z = -inf)
        s = s * scale + tl.sum(e, axis=1)
        if WANT_MEAN:
            sz = sz * scale + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), axis=1)  # not 0 * -inf = NaN
        m = m_new
        # Exactly one tile of one split holds the target; elsewhere this adds zeros.
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * R + offs_r
    tl.store(m_ptr + out, m, mask=mask_r)
    tl.store(s_ptr + out, s, mask=mask_r)
    if WANT_MEAN:
        tl.store(sz_ptr + out, sz, mask=mask_r)
    tl.store(zt_ptr + out, zt, mask=mask_r)


@triton.jit
def _merge_kernel(m_ptr, s_ptr, sz_ptr, zt_ptr, lse_ptr, tgt_logit_ptr, mean_ptr, R, SPLITS,
                  BLOCK: tl.constexpr, WANT_MEAN: tl.constexpr):
    """Combine per-split partials [SPLITS, R] in split order (fixed order: deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    big_m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for i in range(0, SPLITS):
        big_m = tl.maximum(big_m, tl.load(m_ptr + i * R + offs, mask=mask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    sz = tl.zeros((BLOCK,), dtype=tl.float32)
    zt = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, SPLITS):
        scale = tl.exp(tl.load(m_ptr + i * R + offs, mask=mask, other=0.0) - big_m)
        s += tl.load(s_ptr + i * R + offs, mask=mask, other=1.0) * scale  # 1.0: no log(0) in masked lanes
        if WANT_MEAN:
            sz += tl.load(sz_ptr + i * R + offs, mask=mask, other=0.0) * scale
        zt += tl.load(zt_ptr + i * R + offs, mask=mask, other=0.0)
    tl.store(lse_ptr + offs, big_m + tl.log(s), mask=mask)
    tl.store(tgt_logit_ptr + offs, zt, mask=mask)
    if WANT_MEAN:
        tl.store(mean_ptr + offs, sz / s, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
# z_rv = c <h_r, W_sel(v)> with c = inv_temp, p_rv = exp(z_rv - lse_r). The outputs of row r depend on z_r only:
#   logp = z_t - lse:        d/dz_v = [v = t] - p_v
#   lse:                     d/dz_v = p_v
#   entropy = lse - sum p z: d/dz_v = p_v - p_v - sum_u z_u p_u ([u = v] - p_v) = p_v (mean - z_v)
#                            (using d p_u / d z_v = p_u ([u = v] - p_v) and mean = sum_u p_u z_u)
# so with upstream g_logp, g_lse, g_ent:
#   dz_rv = g_logp [v = t] + p_rv (g_lse - g_logp + g_ent mean_r - g_ent z_rv) = g_tgt [v = t] + p_rv (a_r - b_r z_rv)
# (the caller forms g_tgt = g_logp, a = g_lse - g_logp + g_ent mean, b = g_ent). Then by the chain rule through z:
#   dh_r = c sum_v dz_rv W_sel(v)        dW_sel(v) = c sum_r dz_rv h_r      (dw returned in slot order [Vs, H]).
# Per vocabulary chunk of ``chunk`` slots (in chunk order):
#   ``_dz_kernel``  grid (row tiles, chunk tiles): recompute z with the forward's tile code, write c * dz rounded
#                   once to the input dtype into a [R, chunk] scratch buffer (what torch's bf16 autograd does: it
#                   casts the logits' gradient to bf16; Liger-Kernel and cut-cross-entropy do the same).
#   ``_dh_kernel``  grid (row tiles, hidden tiles): dh[rows, cols] (+)= dz[rows, :] @ W[sel(chunk), cols], a plain
#                   tensor-core product, float32 accumulation; the first chunk stores, later chunks add (one
#                   read-modify-write of the float32 [R, H] per chunk).
#   ``_dw_kernel``  grid (chunk tiles, hidden tiles): dw[chunk slots, cols] = dz[:, slots]^T @ h[:, cols], summed
#                   over every row in registers and written once in the weight's dtype: no float32 [Vs, H] buffer.
# Flops: 2 + 2 + 2 R*H*Vs with both gradients (z once, each product once), the floor of this structure. Extra memory:
# the [R, chunk] dz buffer (``_DZ_BUDGET`` elements at most). Every output element has one writer per launch and the
# chunks run in order: two identical calls are bit-identical.

# dz scratch budget in elements ([R, chunk]): 64 MiB in bf16 at LLaDA's head (R = 2048: 16384-slot chunks).
_DZ_BUDGET = 1 << 25
_INTERPRETER_CHUNK = 64  # two 32-wide vocabulary tiles per chunk: small tests cover several chunks


@triton.jit
def _dlogits_tile(z, offs_v, mask_r, mask_v, tgt, lse, g_tgt, a, b, inv_temp, HAS_B: tl.constexpr):
    """inv_temp * dz for one [BLOCK_R, BLOCK_V] tile; exactly 0 outside the valid rows and columns."""
    p = tl.exp(z - lse[:, None])  # 0 in masked columns (z = -inf)
    if HAS_B:
        dz = p * (a[:, None] - b[:, None] * tl.where(mask_v[None, :], z, 0.0))  # not 0 * inf = NaN
    else:
        dz = p * a[:, None]
    dz += tl.where(offs_v[None, :] == tgt[:, None], g_tgt[:, None], 0.0)
    return tl.where(mask_r[:, None] & mask_v[None, :], dz * inv_temp, 0.0)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even, as ``.to`` does on GPU. Triton's interpreter truncates float32
    to bfloat16 instead (round toward zero: twice the error, and biased), so there the rounding is done on the bits
    first and the truncating cast is then exact."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # finite values; no NaN / inf reach here
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, vocab_ptr, tgt_ptr, lse_ptr, g_ptr, a_ptr, b_ptr, dz_ptr,
               R, H, inv_temp, C0, VC, LD,
               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               HAS_VOCAB: tl.constexpr, HAS_B: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """dz[r, j] = inv_temp * dz[r, C0 + j] for j < VC, in dz_ptr's dtype (the input dtype): one rounding."""
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_v = C0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # vocabulary slots
    mask_v = offs_v < C0 + VC
    h_rows = offs_r.to(tl.int64) * H
    w_rows = slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB) * H
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    g_tgt = tl.load(g_ptr + offs_r, mask=mask_r, other=0.0)
    a = tl.load(a_ptr + offs_r, mask=mask_r, other=0.0)
    b = a  # placeholder, unused unless HAS_B
    if HAS_B:
        b = tl.load(b_ptr + offs_r, mask=mask_r, other=0.0)
    z = logits_tile(h_ptr, w_ptr, h_rows, w_rows, mask_r, mask_v, H, inv_temp,
                    BLOCK_R, BLOCK_V, BLOCK_H, UPCAST_DOT, PRECISION)
    dz = _dlogits_tile(z, offs_v, mask_r, mask_v, tgt, lse, g_tgt, a, b, inv_temp, HAS_B)
    ptrs = dz_ptr + offs_r.to(tl.int64)[:, None] * LD + (offs_v - C0)[None, :]
    tl.store(ptrs, _round_to(dz, dz_ptr.dtype.element_ty, UPCAST_DOT), mask=mask_r[:, None] & mask_v[None, :])


@triton.jit
def _dh_kernel(dz_ptr, w_ptr, vocab_ptr, dh_ptr, R, H, C0, VC, LD,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
               HAS_VOCAB: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr,
               PRECISION: tl.constexpr):
    """dh[rows, cols] (+)= dz[rows, :VC] @ W[sel(C0 + :VC), cols] in float32 (ACCUMULATE: add to what is there)."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    dz_rows = offs_r.to(tl.int64) * LD
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, VC, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # chunk-local slots
        mask_k = offs_k < VC
        a_t = tl.load(dz_ptr + dz_rows[:, None] + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        w_rows = slot_tokens(vocab_ptr, C0 + offs_k, mask_k, HAS_VOCAB) * H
        b_t = tl.load(w_ptr + w_rows[:, None] + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if UPCAST_DOT:
            a_t = a_t.to(tl.float32)
            b_t = b_t.to(tl.float32)
        acc = tl.dot(a_t, b_t, acc, input_precision=PRECISION)
    ptrs = dh_ptr + offs_r.to(tl.int64)[:, None] * H + offs_h[None, :]
    mask = mask_r[:, None] & mask_h[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _dw_kernel(dz_ptr, h_ptr, dw_ptr, R, H, C0, VC, LD,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
               UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """dw[C0 + slots, cols] = dz[:, slots]^T @ h[:, cols]: float32 over every row, stored once in dw's dtype."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # chunk-local slots
    mask_v = offs_v < VC
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # rows
        mask_k = offs_k < R
        rows = offs_k.to(tl.int64)
        a_t = tl.load(dz_ptr + rows[:, None] * LD + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :],
                      other=0.0)
        b_t = tl.load(h_ptr + rows[:, None] * H + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if UPCAST_DOT:
            a_t = a_t.to(tl.float32)
            b_t = b_t.to(tl.float32)
        acc = tl.dot(tl.trans(a_t), b_t, acc, input_precision=PRECISION)
    ptrs = dw_ptr + (C0 + offs_v).to(tl.int64)[:, None] * H + offs_h[None, :]  # slot order
    tl.store(ptrs, _round_to(acc, dw_ptr.dtype.element_ty, UPCAST_DOT), mask=mask_v[:, None] & mask_h[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launch settings and launchers
# ----------------------------------------------------------------------------------------------------------------


def _config(kind: str, dtype: torch.dtype, device: torch.device) -> Config:
    """Block sizes from a small heuristic (no autotuning: one config per kernel kind and dtype).

    GPU: 128 x 128 output tiles with a 64-wide reduction step (32 for fp32 operands, twice as wide) keep (tiles x
    stages) within Hopper's 228 KiB shared memory at two programs per SM. ``block_r`` / ``block_v`` / ``block_h``
    name the dimensions each kernel tiles: fwd and dz (rows, slots; hidden is the reduction), dh (rows, reduction
    over slots in ``block_v``, hidden), dw (reduction over rows in ``block_r``, slots, hidden).
    Interpreter: 16/32-wide tiles, so small test shapes still cover ragged edges, several splits and chunks.
    """
    if interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    stages = 2 if dtype == torch.float32 else 3
    k = 32 if dtype == torch.float32 else 64
    if kind == "dh":
        return Config(block_r=128, block_v=k, block_h=128, num_warps=8, num_stages=stages, programs=programs)
    if kind == "dw":
        return Config(block_r=k, block_v=128, block_h=128, num_warps=8, num_stages=stages, programs=programs)
    return Config(block_r=128, block_v=128, block_h=64, num_warps=8, num_stages=stages, programs=programs)


def _launch_forward(h, w, vocab_ids, tgt, inv_temp: float, want_mean: bool, splits: int | None = None):
    num_rows, hidden = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    cfg = _config("fwd", h.dtype, h.device)
    row_tiles = triton.cdiv(num_rows, cfg.block_r)
    # Vocabulary splits until the grid has cfg.programs programs (2 per SM on GPU; the partials are 4 words per
    # split and row, so the cap is the target itself). LLaDA's head at R = 2048: 16 row tiles x 17 splits.
    splits, v_per_split = split(row_tiles, vocab_size, cfg.block_v, cfg.programs, splits, cfg.programs)
    part = torch.empty(4, splits, num_rows, dtype=torch.float32, device=h.device)  # m, s, sz, z_tgt
    _fwd_kernel[(row_tiles, splits)](
        h, w, vocab_ids if vocab_ids is not None else tgt, tgt, part[0], part[1], part[2], part[3],
        num_rows, vocab_size, hidden, inv_temp, v_per_split,
        BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        HAS_VOCAB=vocab_ids is not None, WANT_MEAN=want_mean, UPCAST_DOT=interpreting(),
        PRECISION=precision(h.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    out = torch.empty(3, num_rows, dtype=torch.float32, device=h.device)  # lse, tgt_logit, mean
    block = 32 if interpreting() else 1024
    _merge_kernel[(triton.cdiv(num_rows, block),)](
        part[0], part[1], part[2], part[3], out[0], out[1], out[2], num_rows, splits,
        BLOCK=block, WANT_MEAN=want_mean,
    )
    return out[0], out[1], (out[2] if want_mean else None)


def _chunk(num_rows: int, vocab_size: int, quantum: int, chunk: int | None) -> int:
    """Slots per backward chunk: a multiple of ``quantum`` (the dz kernel's vocabulary tile), at least one tile,
    at most the vocabulary, and within ``_DZ_BUDGET`` elements of dz (interpreter: ``_INTERPRETER_CHUNK``)."""
    if chunk is None:
        chunk = _INTERPRETER_CHUNK if interpreting() else _DZ_BUDGET // max(num_rows, 1)
    chunk = max(quantum, chunk // quantum * quantum)
    return min(chunk, triton.cdiv(vocab_size, quantum) * quantum)


def _launch_backward(h, w, vocab_ids, tgt, inv_temp: float, lse, g_tgt, a, b, need_dh: bool, need_dw: bool,
                     chunk: int | None = None):
    """(dh float32 [R, H] | None, dw [Vs, H] in w's dtype | None), chunk by chunk over the vocabulary."""
    num_rows, hidden = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    dev = h.device
    dh = torch.empty(num_rows, hidden, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.empty(vocab_size, hidden, dtype=w.dtype, device=dev) if need_dw else None
    if not (need_dh or need_dw):
        return dh, dw
    cz, ch, cw = (_config(kind, h.dtype, dev) for kind in ("dz", "dh", "dw"))
    chunk = _chunk(num_rows, vocab_size, cz.block_v, chunk)
    dz = torch.empty(num_rows, chunk, dtype=h.dtype, device=dev)
    ids = vocab_ids if vocab_ids is not None else tgt  # any int64 pointer when HAS_VOCAB is False
    common = dict(UPCAST_DOT=interpreting(), PRECISION=precision(h.dtype))
    for c0 in range(0, vocab_size, chunk):
        vc = min(chunk, vocab_size - c0)
        _dz_kernel[(triton.cdiv(num_rows, cz.block_r), triton.cdiv(vc, cz.block_v))](
            h, w, ids, tgt, lse, g_tgt, a, b if b is not None else a, dz,
            num_rows, hidden, inv_temp, c0, vc, chunk,
            BLOCK_R=cz.block_r, BLOCK_V=cz.block_v, BLOCK_H=cz.block_h,
            HAS_VOCAB=vocab_ids is not None, HAS_B=b is not None,
            num_warps=cz.num_warps, num_stages=cz.num_stages, **common,
        )
        if need_dh:
            _dh_kernel[(triton.cdiv(num_rows, ch.block_r), triton.cdiv(hidden, ch.block_h))](
                dz, w, ids, dh, num_rows, hidden, c0, vc, chunk,
                BLOCK_R=ch.block_r, BLOCK_K=ch.block_v, BLOCK_H=ch.block_h,
                HAS_VOCAB=vocab_ids is not None, ACCUMULATE=c0 > 0,
                num_warps=ch.num_warps, num_stages=ch.num_stages, **common,
            )
        if need_dw:
            _dw_kernel[(triton.cdiv(vc, cw.block_v), triton.cdiv(hidden, cw.block_h))](
                dz, h, dw, num_rows, hidden, c0, vc, chunk,
                BLOCK_V=cw.block_v, BLOCK_K=cw.block_r, BLOCK_H=cw.block_h,
                num_warps=cw.num_warps, num_stages=cw.num_stages, **common,
            )
    return dh, dw


# ----------------------------------------------------------------------------------------------------------------
# Public functions (reference.backend_contract)
# ----------------------------------------------------------------------------------------------------------------


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
            want_mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, tgt_logit, mean_logit | None), float32 [R] each; see ``reference.backend_contract``."""
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    return _launch_forward(h.contiguous(), w.contiguous(), vocab_ids, tgt.contiguous(), float(inv_temp),
                           bool(want_mean))


def backward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
             lse: torch.Tensor, g_tgt: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_dh: bool,
             need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dh float32 [R, H] | None, dw [Vs, H] in w's dtype, slot order | None); see ``reference.backend_contract``."""
    h, w, tgt = h.contiguous(), w.contiguous(), tgt.contiguous()
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    lse, g_tgt, a = lse.float().contiguous(), g_tgt.float().contiguous(), a.float().contiguous()
    b = b.float().contiguous() if b is not None else None
    return _launch_backward(h, w, vocab_ids, tgt, float(inv_temp), lse, g_tgt, a, b, bool(need_dh), bool(need_dw))
