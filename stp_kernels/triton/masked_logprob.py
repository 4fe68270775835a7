"""``triton`` backend of ``masked_logprob``: tiled LM head + online log-sum-exp, deterministic backward.

Interface: ``reference.backend_contract`` (``forward`` / ``backward`` below), the same as ``torch_chunked``.
Layers, as in Liger-Kernel's ops: private ``@triton.jit`` kernels, plain launchers (``_launch_*``), the two public
functions. The autograd Function lives in ``stp_kernels.masked_logprob`` and is shared by every backend.

Notation: ``R`` scored rows, ``H`` hidden size, ``Vs`` vocabulary slots (``len(vocab_ids)`` or ``V``),
``sel(v)`` = ``vocab_ids[v]`` (or ``v``): the weight row of slot ``v``, gathered inside the kernels.

Kernels and cost (flops, in multiples of R*H*Vs):
  forward   grid (row tiles, vocab splits): z tile by tile, running max / sum / sum p*z, target logit picked up
            in passing; one fp32 partial (m, s, sz, z_tgt) per split, merged by ``_merge_kernel`` in split order.
            2 R*H*Vs flops; [R, Vs] is never written.
  backward  ``_dh_kernel`` grid (row tiles, vocab splits): recompute z (2), dh += dz @ W_tile (2).
            ``_dw_kernel`` grid (vocab tiles, row splits): recompute z (2), dw += dz^T @ h_tile (2).
            8 R*H*Vs flops with both gradients, 4 with one, for fp32; 16-bit inputs run each gradient product
            twice on a hi/lo split of dz (``_split_dz``): 12 and 6. The z recompute is paid twice because sharing one dz
            tile between dh and dw would need float atomics (cut-cross-entropy does that: 6 units, but the sum
            order then depends on scheduling). Every output element here has exactly one writer program, and
            partials from splits are summed in split order: two identical calls are bit-identical.
Splits exist for occupancy: with R = 2048 and BLOCK_R = 128 there are only 16 row tiles for 132 SMs.

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
# Shared tile helpers
# ----------------------------------------------------------------------------------------------------------------


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
# Both kernels recompute z with the forward's tile code, form c * dz in fp32 and feed it to tl.dot in the input dtype
# (bf16 tensor cores on GPU; the same rounding as torch's bf16 backward, which casts the logits' gradient to bf16).
# Each kernel accumulates its gradient by read-modify-write of rows only it owns: dh_part[split, row tile, :] or
# dw_part[split, vocab tile, :]. That traffic is R*Vs*H*8/BLOCK_V bytes for dh (R*Vs*H*8/BLOCK_R for dw), hence the
# wide tile along the summed dimension in ``_config``.


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
def _split_dz(dz, dtype, UPCAST_DOT: tl.constexpr):
    """dz (fp32) as hi + lo in the operand dtype, for two tensor-core products instead of one.

    Rounding dz to bf16 before dz @ W (what torch's bf16 autograd does) measured 1.2x-2.1x torch's own bf16
    gradient error over 8 seeds (interpreter, R=23, H=40, V=301); hi + lo carries ~16 mantissa bits and measured
    0.7x-0.8x, the same as an fp32 dz. Cost: each kernel's gradient product runs twice (6 R*H*Vs per kernel
    instead of 4).
    For fp32 operands hi == dz and lo is unused (SPLIT_DZ is False).
    """
    dz_hi = dz.to(dtype)
    dz_lo = (dz - dz_hi.to(tl.float32)).to(dtype)
    if UPCAST_DOT:
        dz_hi = dz_hi.to(tl.float32)
        dz_lo = dz_lo.to(tl.float32)
    return dz_hi, dz_lo


@triton.jit
def _dh_kernel(h_ptr, w_ptr, vocab_ptr, tgt_ptr, lse_ptr, g_ptr, a_ptr, b_ptr, dh_ptr,
               R, Vs, H, inv_temp, V_PER_SPLIT,
               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               HAS_VOCAB: tl.constexpr, HAS_B: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
               SPLIT_DZ: tl.constexpr):
    """dh_part[split, rows] = sum over the split's vocabulary tiles of (c dz) @ W_tile (dh_part zero-initialised)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h_rows = offs_r.to(tl.int64) * H
    dh_rows = pid_s.to(tl.int64) * R * H + h_rows
    tgt = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    g_tgt = tl.load(g_ptr + offs_r, mask=mask_r, other=0.0)
    a = tl.load(a_ptr + offs_r, mask=mask_r, other=0.0)
    b = a  # placeholder, unused unless HAS_B
    if HAS_B:
        b = tl.load(b_ptr + offs_r, mask=mask_r, other=0.0)

    v_start = pid_s * V_PER_SPLIT
    v_stop = tl.minimum(v_start + V_PER_SPLIT, Vs)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        w_rows = slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB) * H
        z = logits_tile(h_ptr, w_ptr, h_rows, w_rows, mask_r, mask_v, H, inv_temp,
                        BLOCK_R, BLOCK_V, BLOCK_H, UPCAST_DOT, PRECISION)
        dz = _dlogits_tile(z, offs_v, mask_r, mask_v, tgt, lse, g_tgt, a, b, inv_temp, HAS_B)
        dz_hi, dz_lo = _split_dz(dz, w_ptr.dtype.element_ty, UPCAST_DOT)
        for k in range(0, H, BLOCK_H):
            offs_h = k + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w_t = tl.load(w_ptr + w_rows[:, None] + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :],
                          other=0.0)
            if UPCAST_DOT:
                w_t = w_t.to(tl.float32)
            ptrs = dh_ptr + dh_rows[:, None] + offs_h[None, :]
            mask = mask_r[:, None] & mask_h[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            acc = tl.dot(dz_hi, w_t, acc, input_precision=PRECISION)
            if SPLIT_DZ:
                acc = tl.dot(dz_lo, w_t, acc, input_precision=PRECISION)
            tl.store(ptrs, acc, mask=mask)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, vocab_ptr, tgt_ptr, lse_ptr, g_ptr, a_ptr, b_ptr, dw_ptr,
               R, Vs, H, inv_temp, R_PER_SPLIT,
               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               HAS_VOCAB: tl.constexpr, HAS_B: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
               SPLIT_DZ: tl.constexpr):
    """dw_part[split, slots] = sum over the split's row tiles of (c dz)^T @ h_tile (dw_part zero-initialised)."""
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Vs
    w_rows = slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB) * H
    dw_rows = pid_s.to(tl.int64) * Vs * H + offs_v.to(tl.int64) * H  # slot order, not weight-row order

    r_start = pid_s * R_PER_SPLIT
    r_stop = tl.minimum(r_start + R_PER_SPLIT, R)
    for r0 in range(r_start, r_stop, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r_stop
        h_rows = offs_r.to(tl.int64) * H
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
        dz_hi, dz_lo = _split_dz(dz, h_ptr.dtype.element_ty, UPCAST_DOT)
        dz_hi_t = tl.trans(dz_hi)
        dz_lo_t = tl.trans(dz_lo)
        for k in range(0, H, BLOCK_H):
            offs_h = k + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            h_t = tl.load(h_ptr + h_rows[:, None] + offs_h[None, :], mask=mask_r[:, None] & mask_h[None, :],
                          other=0.0)
            if UPCAST_DOT:
                h_t = h_t.to(tl.float32)
            ptrs = dw_ptr + dw_rows[:, None] + offs_h[None, :]
            mask = mask_v[:, None] & mask_h[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            acc = tl.dot(dz_hi_t, h_t, acc, input_precision=PRECISION)
            if SPLIT_DZ:
                acc = tl.dot(dz_lo_t, h_t, acc, input_precision=PRECISION)
            tl.store(ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch settings and launchers
# ----------------------------------------------------------------------------------------------------------------

# Splits multiply the partial buffers (dh_part is splits * R * H fp32), so they stop where occupancy is reached.
_MAX_SPLITS = 8


def _config(kind: str, dtype: torch.dtype, device: torch.device) -> Config:
    """Block sizes from a small heuristic (no autotuning: one config per kernel kind and dtype).

    GPU: 128-wide tiles along the dimension the kernel sums over (vocabulary for dh, rows for dw) halve the
    read-modify-write traffic of the fp32 gradient; 64-wide BLOCK_H keeps (tiles x stages) of bf16 operands
    within Hopper's 228 KiB shared memory. fp32 operands are twice as wide, so fewer stages. Two programs per SM.
    Interpreter: 16/32-wide tiles, so small test shapes still cover ragged edges and several splits.
    """
    if interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    stages = 2 if dtype == torch.float32 else 3
    if kind == "dw":
        return Config(block_r=128, block_v=64, block_h=64, num_warps=8, num_stages=stages, programs=programs)
    if kind == "dh":
        return Config(block_r=64, block_v=128, block_h=64, num_warps=8, num_stages=stages, programs=programs)
    return Config(block_r=128, block_v=128, block_h=64, num_warps=8, num_stages=stages, programs=programs)


def _launch_forward(h, w, vocab_ids, tgt, inv_temp: float, want_mean: bool, splits: int | None = None):
    num_rows, hidden = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    cfg = _config("fwd", h.dtype, h.device)
    row_tiles = triton.cdiv(num_rows, cfg.block_r)
    splits, v_per_split = split(row_tiles, vocab_size, cfg.block_v, cfg.programs, splits, _MAX_SPLITS)
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


def _launch_grad(kind: str, h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, splits: int | None = None):
    """dh (kind "dh": grid row tiles x vocabulary splits) or dw (kind "dw": vocabulary tiles x row splits), fp32."""
    num_rows, hidden = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    cfg = _config(kind, h.dtype, h.device)
    if kind == "dh":
        kernel, outer_tiles, out_rows = _dh_kernel, triton.cdiv(num_rows, cfg.block_r), num_rows
        splits, per_split = split(outer_tiles, vocab_size, cfg.block_v, cfg.programs, splits, _MAX_SPLITS)
    else:
        kernel, outer_tiles, out_rows = _dw_kernel, triton.cdiv(vocab_size, cfg.block_v), vocab_size
        splits, per_split = split(outer_tiles, num_rows, cfg.block_r, cfg.programs, splits, _MAX_SPLITS)
    part = torch.zeros(splits, out_rows, hidden, dtype=torch.float32, device=h.device)
    kernel[(outer_tiles, splits)](
        h, w, vocab_ids if vocab_ids is not None else tgt, tgt, lse, g_tgt, a, b if b is not None else a, part,
        num_rows, vocab_size, hidden, inv_temp, per_split,
        BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        HAS_VOCAB=vocab_ids is not None, HAS_B=b is not None, UPCAST_DOT=interpreting(),
        PRECISION=precision(h.dtype), SPLIT_DZ=h.dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_splits(part)


def _sum_splits(part: torch.Tensor) -> torch.Tensor:
    """Sum [splits, ...] partials in split order (a left fold: deterministic, unlike atomics).

    The result is a fresh tensor (or the only split), so the partial buffer is freed when the caller drops it.
    """
    if part.shape[0] == 1:
        return part[0]
    out = part[0] + part[1]
    for i in range(2, part.shape[0]):
        out += part[i]
    return out


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
    """(dh float32 [R, H] | None, dw float32 [Vs, H] in slot order | None); see ``reference.backend_contract``."""
    h, w, tgt = h.contiguous(), w.contiguous(), tgt.contiguous()
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    lse, g_tgt, a = lse.float().contiguous(), g_tgt.float().contiguous(), a.float().contiguous()
    b = b.float().contiguous() if b is not None else None
    args = (h, w, vocab_ids, tgt, float(inv_temp), lse, g_tgt, a, b)
    dh = _launch_grad("dh", *args) if need_dh else None
    dw = _launch_grad("dw", *args) if need_dw else None
    return dh, dw
