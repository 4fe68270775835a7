"""Triton epilogues of the ``gemm`` backends: fold one float32 logits chunk (written by a BLAS/cuBLAS matmul) into
per-row running statistics, or turn it into the chunk's logit gradient.

The chunk ``z`` is [R, width] float32, row stride ``z_stride``; its columns are vocabulary slots
``start .. start + width - 1``. Every kernel reads each element of the chunk once.

Kernels:
  ``_lse_kernel``     grid (row blocks). Online (max, sum exp, sum exp * z) of ``z * inv_temp`` over the chunk's
                      column tiles, merged into the running per-row state (m, s, sz) left by the previous chunks,
                      and the target logit when a row's target slot lies in the chunk.
  ``_dz_kernel``      grid (row blocks, column blocks). dz = inv_temp * (g_tgt [v == tgt] + p (a - b z)) with
                      p = exp(z * inv_temp - lse): written ONCE, in the dtype of ``dz`` (the input dtype).
  ``_sample_kernel``  grid (row blocks). score = z * inv_temp + gumbel(key_r, token(v)) (GREEDY: score = z),
                      running first argmax (a later tile or chunk replaces only on a strictly greater score: ties go
                      to the lowest slot) with its untempered z, and online (max, sum exp, sum exp * z) of the
                      untempered z (log-sum-exp and mean logit).
One program owns a row block for the whole chunk and chunks are folded in order: no atomics, a fixed reduction
order, bitwise identical results run to run.

Interpreter (``TRITON_INTERPRET=1``, CPU tests): small blocks so test shapes cover ragged rows and columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, online_lse, tempered_sum
from .sample_step import _gumbel

__all__ = ["check", "fold_lse", "logit_grad", "fold_sample"]


def check() -> None:
    """Raise when these kernels cannot run here (importing this module already needs triton)."""
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError("no CUDA device and TRITON_INTERPRET != '1' (it must be set before triton is imported)")


def _blocks() -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps): one or two rows per program keeps 1000s of programs in flight
    at R = 2048; 1024-column tiles read 4 KiB per row per step."""
    if interpreting():
        return 4, 64, 1
    return 2, 1024, 4


@triton.jit
def _lse_kernel(z_ptr, z_stride, m_ptr, s_ptr, sz_ptr, tgt_logit_ptr, tgt_ptr, R, width, start, inv_temp,
                WANT_MEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = offs_r.to(tl.int64) * z_stride
    m = tl.load(m_ptr + offs_r, mask=mask_r, other=0.0)
    s = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0)
    if WANT_MEAN:
        sz = tl.load(sz_ptr + offs_r, mask=mask_r, other=0.0)
    else:
        sz = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < width
        inside = mask_r[:, None] & mask_c[None, :]
        z = tl.load(z_ptr + rows[:, None] + cols[None, :], mask=inside, other=0.0) * inv_temp
        z = tl.where(mask_c[None, :], z, float("-inf"))
        m, s, sz = online_lse(z, mask_c, m, s, sz, WANT_MEAN)
    tl.store(m_ptr + offs_r, m, mask=mask_r)
    tl.store(s_ptr + offs_r, s, mask=mask_r)
    if WANT_MEAN:
        tl.store(sz_ptr + offs_r, sz, mask=mask_r)
    t = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1) - start
    hit = mask_r & (t >= 0) & (t < width)
    zt = tl.load(z_ptr + rows + tl.where(hit, t, 0), mask=hit, other=0.0) * inv_temp
    tl.store(tgt_logit_ptr + offs_r, zt, mask=hit)


@triton.jit
def _dz_kernel(z_ptr, z_stride, dz_ptr, dz_stride, lse_ptr, g_tgt_ptr, a_ptr, b_ptr, tgt_ptr, R, width, start,
               inv_temp, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    inside = mask_r[:, None] & (cols < width)[None, :]
    z = tl.load(z_ptr + offs_r.to(tl.int64)[:, None] * z_stride + cols[None, :], mask=inside, other=0.0) * inv_temp
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    a = tl.load(a_ptr + offs_r, mask=mask_r, other=0.0)
    coef = a[:, None]
    if HAS_B:
        b = tl.load(b_ptr + offs_r, mask=mask_r, other=0.0)
        coef = coef - b[:, None] * z
    dz = tl.exp(z - lse[:, None]) * coef
    t = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1) - start
    g = tl.load(g_tgt_ptr + offs_r, mask=mask_r, other=0.0)
    dz = dz + tl.where(cols[None, :] == t[:, None], g[:, None], 0.0)
    dz = dz * inv_temp
    out = dz_ptr + offs_r.to(tl.int64)[:, None] * dz_stride + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sample_kernel(z_ptr, z_stride, keys_ptr, vocab_ptr, best_ptr, slot_ptr, zsel_ptr, m_ptr, s_ptr, sz_ptr, st_ptr,
                   R, width, start, inv_temp, GREEDY: tl.constexpr, HAS_VOCAB: tl.constexpr,
                   WANT_MEAN: tl.constexpr, WANT_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   FAST_LOG: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = offs_r.to(tl.int64) * z_stride
    keys = tl.load(keys_ptr + offs_r, mask=mask_r, other=0).to(tl.uint32)  # int64 holding uint32: truncation
    best = tl.load(best_ptr + offs_r, mask=mask_r, other=0.0)
    slot = tl.load(slot_ptr + offs_r, mask=mask_r, other=0)
    zsel = tl.load(zsel_ptr + offs_r, mask=mask_r, other=0.0)
    m = tl.load(m_ptr + offs_r, mask=mask_r, other=0.0)
    s = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0)
    if WANT_MEAN:
        sz = tl.load(sz_ptr + offs_r, mask=mask_r, other=0.0)
    else:
        sz = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if WANT_T:
        st = tl.load(st_ptr + offs_r, mask=mask_r, other=0.0)
    else:
        st = tl.zeros((BLOCK_R,), dtype=tl.float32)
    local = tl.arange(0, BLOCK_C)
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + local
        mask_c = cols < width
        z = tl.load(z_ptr + rows[:, None] + cols[None, :], mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        z = tl.where(mask_c[None, :], z, float("-inf"))
        if GREEDY:
            score = z
        else:
            slots = start + cols
            if HAS_VOCAB:
                toks = tl.load(vocab_ptr + slots, mask=mask_c, other=0)
            else:
                toks = tl.where(mask_c, slots, 0)
            score = tl.where(mask_c[None, :], z * inv_temp + _gumbel(keys, toks.to(tl.uint32), FAST_LOG),
                             float("-inf"))
        tmax = tl.max(score, axis=1)
        targ = tl.min(tl.where(score == tmax[:, None], local[None, :], BLOCK_C), axis=1)  # first maximal column
        tz = tl.sum(tl.where(local[None, :] == targ[:, None], z, 0.0), axis=1)
        better = tmax > best  # strict: an earlier tile or chunk keeps ties
        best = tl.where(better, tmax, best)
        slot = tl.where(better, start + c0 + targ.to(tl.int64), slot)
        zsel = tl.where(better, tz, zsel)
        if WANT_T:
            st = tempered_sum(z, m, st, inv_temp)
        m, s, sz = online_lse(z, mask_c, m, s, sz, WANT_MEAN)
    tl.store(best_ptr + offs_r, best, mask=mask_r)
    tl.store(slot_ptr + offs_r, slot, mask=mask_r)
    tl.store(zsel_ptr + offs_r, zsel, mask=mask_r)
    tl.store(m_ptr + offs_r, m, mask=mask_r)
    tl.store(s_ptr + offs_r, s, mask=mask_r)
    if WANT_MEAN:
        tl.store(sz_ptr + offs_r, sz, mask=mask_r)
    if WANT_T:
        tl.store(st_ptr + offs_r, st, mask=mask_r)


def fold_lse(z: torch.Tensor, start: int, inv_temp: float, tgt: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
             sz: torch.Tensor | None, tgt_logit: torch.Tensor) -> None:
    """Fold chunk ``z`` (slots start..start+width-1) into (m, s, sz) in place; tgt_logit where the target is in it."""
    rows, width = z.shape
    block_r, block_c, warps = _blocks()
    _lse_kernel[(triton.cdiv(rows, block_r),)](
        z, z.stride(0), m, s, s if sz is None else sz, tgt_logit, tgt, rows, width, start, float(inv_temp),
        WANT_MEAN=sz is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def logit_grad(z: torch.Tensor, start: int, inv_temp: float, tgt: torch.Tensor, lse: torch.Tensor,
               g_tgt: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, dz: torch.Tensor) -> None:
    """Write the chunk's logit gradient into ``dz`` (same shape as ``z``, the input dtype)."""
    rows, width = z.shape
    block_r, block_c, warps = _blocks()
    block_r = block_r * 4  # elementwise: a 2-D grid of [8, 1024] tiles on GPU
    grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_c))
    _dz_kernel[grid](z, z.stride(0), dz, dz.stride(0), lse, g_tgt, a, a if b is None else b, tgt, rows, width,
                     start, float(inv_temp), HAS_B=b is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                     num_warps=warps)


def fold_sample(z: torch.Tensor, start: int, inv_temp: float, greedy: bool, keys: torch.Tensor,
                vocab_ids: torch.Tensor | None, best: torch.Tensor, slot: torch.Tensor, z_sel: torch.Tensor,
                m: torch.Tensor, s: torch.Tensor, sz: torch.Tensor | None, st: torch.Tensor | None = None) -> None:
    """Fold untempered chunk ``z`` into the running (best score, slot, z_sel), (m, s, sz) and, when given, the
    tempered sum st = sum exp((z - m) * inv_temp) in place."""
    rows, width = z.shape
    block_r, block_c, warps = _blocks()
    _sample_kernel[(triton.cdiv(rows, block_r),)](
        z, z.stride(0), keys, keys if vocab_ids is None else vocab_ids, best, slot, z_sel, m, s,
        s if sz is None else sz, s if st is None else st, rows, width, start, float(inv_temp), GREEDY=greedy,
        HAS_VOCAB=vocab_ids is not None, WANT_MEAN=sz is not None, WANT_T=st is not None, BLOCK_R=block_r,
        BLOCK_C=block_c, FAST_LOG=not interpreting(), num_warps=warps)
