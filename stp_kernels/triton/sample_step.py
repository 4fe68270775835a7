"""``triton`` backend of ``sample_step``: tiled LM head + in-kernel counter noise + running argmax / log-sum-exp.

Interface: the contract in ``stp_kernels.torch_chunked_sample_step`` (``forward`` below), the same as
``torch_chunked``. Layers as in ``triton/masked_logprob.py``: private ``@triton.jit`` kernels, a plain launcher,
the public function.

Notation: ``R`` scored rows, ``H`` hidden size, ``Vs`` vocabulary slots (``len(vocab_ids)`` or ``V``), token of
slot ``v`` = ``vocab_ids[v]`` (or ``v``): the weight row gathered for it and the id the noise is keyed by.

Kernels:
  ``_fwd_kernel``   grid (row tiles, vocab splits). Per vocabulary tile of its split: z = h @ W[tok]^T in fp32
                    (``tl.dot``), bits = mix32(key_r ^ mix32(tok)) in uint32 arithmetic (``_mix32``, bit-identical
                    to ``reference.mix32``), u = ((bits >> 9) + 0.5) * 2^-23, g = -log(-log(u)),
                    score = z * inv_temp + g (GREEDY: score = z). Keeps per row: best score, its slot and its z
                    (first maximal index within a tile; a later tile replaces only on a strictly greater score, so
                    ties go to the lowest slot), and an online (max, sum exp, and with WANT_MEAN sum exp * z) of
                    the untempered z. Writes one partial per (split, row).
  ``_merge_kernel`` folds the split partials in split order 0..S-1 (strictly-greater again: an earlier split
                    keeps ties) -> slot, z_sel, lse (and mean = sum exp * z / sum exp, when WANT_MEAN).
[R, Vs] is never written; no atomics, a fixed reduction order: two identical calls are bit-identical.

Numerics: fp32 accumulation (bf16/fp16 operands accumulate in fp32 in ``tl.dot``; fp32 operands use
``input_precision="ieee"``, not TF32). The noise bits are exact; the two logs of the Gumbel noise use the hardware's
fast log2 (``_gumbel_from_u``), within ~1e-6 of torch's float32 noise, which can only flip the argmax at near-ties
(score gaps ~1e-6).

Interpreter (``TRITON_INTERPRET=1``): ``tl.dot`` on bf16/fp16 returns garbage there, so ``UPCAST_DOT`` converts
operands to fp32 first; tiny blocks so test shapes cover several tiles, ragged edges and splits.

Status: verified against ``sample_step_reference`` / ``torch_chunked`` under the interpreter only; GPU compilation,
launch settings and speed are not yet measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import (INTERPRETER_CONFIG, Config, interpreting, logits_tile, online_lse, precision, slot_tokens, split,
                      tempered_sum)

__all__ = ["check", "forward"]


def check() -> None:
    """Raise when these kernels cannot run here (importing this module already needs triton)."""
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError("no CUDA device and TRITON_INTERPRET != '1' (it must be set before triton is imported)")


# ----------------------------------------------------------------------------------------------------------------
# Counter-based noise (reference.mix32 / counter_uniform, bit for bit)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """lowbias32 on uint32: multiplies wrap mod 2**32 and shifts of unsigned values are logical."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """log2 in float32: the hardware approximation (``lg2.approx.f32`` via ``__nv_fast_log2f``, a few instructions;
    absolute error ~2**-22 near 1, relative ~2**-22 elsewhere) on a GPU; numpy's log2 in the interpreter, which
    cannot run external functions."""
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel_from_u(u, w, FAST_LOG: tl.constexpr):
    """-log(-log(u)) for u in (0, 1) with w = 1 - u (exact), using only the fast log2 (``reference.gumbel_fast``
    mirrors it in torch). The inner -log(u) near u = 1 (w <= 1/4) is the series w + w^2/2 + ... + w^11/11 (relative
    truncation error < 2e-8), where an approximate log of a number near 1 would lose every digit (and could even
    give 0 or a positive log, i.e. infinite noise); elsewhere -log2(u) ln 2. Error against exact float32 noise:
    ~1e-6 at most (the outer log's absolute error), far below a bf16 logit's rounding."""
    LN2: tl.constexpr = 0.6931471805599453
    series = 1.0 / 11.0
    series = series * w + 1.0 / 10.0
    series = series * w + 1.0 / 9.0
    series = series * w + 1.0 / 8.0
    series = series * w + 1.0 / 7.0
    series = series * w + 1.0 / 6.0
    series = series * w + 1.0 / 5.0
    series = series * w + 1.0 / 4.0
    series = series * w + 1.0 / 3.0
    series = series * w + 0.5
    series = (series * w + 1.0) * w
    e = tl.where(w <= 0.25, series, -_log2(u, FAST_LOG) * LN2)
    return -_log2(e, FAST_LOG) * LN2


@triton.jit
def _gumbel(keys, toks, FAST_LOG: tl.constexpr):
    """float32 Gumbel noise [BLOCK_R, BLOCK_V] from uint32 row keys [BLOCK_R] and uint32 token ids [BLOCK_V]."""
    bits = _mix32(keys[:, None] ^ _mix32(toks)[None, :])
    k = (bits >> 9).to(tl.float32)  # 23 random bits, exact in float32
    u = (k + 0.5) * 1.1920928955078125e-07  # 2**-23: exact, strictly inside (0, 1)
    w = ((8388607.0 - k) + 0.5) * 1.1920928955078125e-07  # 1 - u, exact
    return _gumbel_from_u(u, w, FAST_LOG)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, vocab_ptr, keys_ptr,
                best_ptr, slot_ptr, zsel_ptr, m_ptr, s_ptr, sz_ptr, st_ptr,
                R, Vs, H, inv_temp, V_PER_SPLIT,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_VOCAB: tl.constexpr, GREEDY: tl.constexpr, WANT_MEAN: tl.constexpr, WANT_T: tl.constexpr,
                UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr, FAST_LOG: tl.constexpr):
    pid_r = tl.program_id(0)  # row tiles vary fastest, so concurrent programs share the split's weight tiles in L2
    pid_s = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h_rows = offs_r.to(tl.int64) * H
    keys = tl.load(keys_ptr + offs_r, mask=mask_r, other=0).to(tl.uint32)  # int64 holding uint32: truncation

    best = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    slot = tl.zeros((BLOCK_R,), dtype=tl.int64)
    zsel = tl.zeros((BLOCK_R,), dtype=tl.float32)
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_R,), dtype=tl.float32)
    st = tl.zeros((BLOCK_R,), dtype=tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_stop = tl.minimum(v_start + V_PER_SPLIT, Vs)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        toks = slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB)  # [BLOCK_V] token ids: the noise counter
        # untempered logits [BLOCK_R, BLOCK_V]; -inf past the split's edge
        z = logits_tile(h_ptr, w_ptr, h_rows, toks * H, mask_r, mask_v, H, 1.0,
                        BLOCK_R, BLOCK_V, BLOCK_H, UPCAST_DOT, PRECISION)
        if GREEDY:
            score = z
        else:
            score = tl.where(mask_v[None, :], z * inv_temp + _gumbel(keys, toks.to(tl.uint32), FAST_LOG),
                             float("-inf"))
        # First maximal column of the tile (explicit, not relying on tl.argmax's tie rule).
        tmax = tl.max(score, axis=1)
        cols = tl.arange(0, BLOCK_V)
        targ = tl.min(tl.where(score == tmax[:, None], cols[None, :], BLOCK_V), axis=1)
        tz = tl.sum(tl.where(cols[None, :] == targ[:, None], z, 0.0), axis=1)  # z at the tile's argmax
        better = tmax > best  # strict: an earlier tile keeps ties
        best = tl.where(better, tmax, best)
        slot = tl.where(better, v0 + targ.to(tl.int64), slot)
        zsel = tl.where(better, tz, zsel)

        if WANT_T:
            st = tempered_sum(z, m, st, inv_temp)
        m, s, sz = online_lse(z, mask_v, m, s, sz, WANT_MEAN)  # every tile has a column inside the split

    out = pid_s.to(tl.int64) * R + offs_r
    tl.store(best_ptr + out, best, mask=mask_r)
    tl.store(slot_ptr + out, slot, mask=mask_r)
    tl.store(zsel_ptr + out, zsel, mask=mask_r)
    tl.store(m_ptr + out, m, mask=mask_r)
    tl.store(s_ptr + out, s, mask=mask_r)
    if WANT_MEAN:
        tl.store(sz_ptr + out, sz, mask=mask_r)
    if WANT_T:
        tl.store(st_ptr + out, st, mask=mask_r)


@triton.jit
def _merge_kernel(best_ptr, slot_ptr, zsel_ptr, m_ptr, s_ptr, sz_ptr, st_ptr, slot_out, zsel_out, lse_out, mean_out,
                  tlse_out, R, SPLITS, inv_temp, BLOCK: tl.constexpr, WANT_MEAN: tl.constexpr,
                  WANT_T: tl.constexpr):
    """Combine per-split partials [SPLITS, R] in split order (fixed order: deterministic; ties to the lower split)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    slot = tl.zeros((BLOCK,), dtype=tl.int64)
    zsel = tl.zeros((BLOCK,), dtype=tl.float32)
    big_m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for i in range(0, SPLITS):
        b_i = tl.load(best_ptr + i * R + offs, mask=mask, other=float("-inf"))
        better = b_i > best
        best = tl.where(better, b_i, best)
        slot = tl.where(better, tl.load(slot_ptr + i * R + offs, mask=mask, other=0), slot)
        zsel = tl.where(better, tl.load(zsel_ptr + i * R + offs, mask=mask, other=0.0), zsel)
        big_m = tl.maximum(big_m, tl.load(m_ptr + i * R + offs, mask=mask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    sz = tl.zeros((BLOCK,), dtype=tl.float32)
    st = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, SPLITS):
        m_i = tl.load(m_ptr + i * R + offs, mask=mask, other=0.0)
        scale = tl.exp(m_i - big_m)
        s += tl.load(s_ptr + i * R + offs, mask=mask, other=1.0) * scale  # 1.0: no log(0) in masked lanes
        if WANT_MEAN:
            sz += tl.load(sz_ptr + i * R + offs, mask=mask, other=0.0) * scale
        if WANT_T:
            st += tl.load(st_ptr + i * R + offs, mask=mask, other=1.0) * tl.exp((m_i - big_m) * inv_temp)
    tl.store(slot_out + offs, slot, mask=mask)
    tl.store(zsel_out + offs, zsel, mask=mask)
    tl.store(lse_out + offs, big_m + tl.log(s), mask=mask)
    if WANT_MEAN:
        tl.store(mean_out + offs, sz / s, mask=mask)
    if WANT_T:
        tl.store(tlse_out + offs, big_m * inv_temp + tl.log(st), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch settings and launcher
# ----------------------------------------------------------------------------------------------------------------

def _config(dtype: torch.dtype, device: torch.device) -> Config:
    """One heuristic config (no autotuning). GPU: the masked_logprob forward's tiles, a 64-row tile (sampling
    batches are often a few hundred rows) and enough vocabulary splits for ~4 programs per SM (the partials are
    5-6 words per split and row: small). Interpreter: 16/32-wide tiles so small test shapes still cover ragged
    edges, several tiles and splits."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_CONFIG
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    stages = 2 if dtype == torch.float32 else 3
    return Config(block_r=64, block_v=128, block_h=64, num_warps=8, num_stages=stages, programs=programs)


def _launch_forward(h, w, vocab_ids, keys, inv_temp: float, greedy: bool, want_mean: bool,
                    splits: int | None = None, want_tlse: bool = False):
    num_rows, hidden = h.shape
    vocab_size = w.shape[0] if vocab_ids is None else vocab_ids.shape[0]
    dev = h.device
    slot = torch.empty(num_rows, dtype=torch.int64, device=dev)
    out = torch.empty(4, num_rows, dtype=torch.float32, device=dev)  # z_sel, lse, mean, tlse
    mean = out[2] if want_mean else None
    tail = (out[3],) if want_tlse else ()
    if num_rows == 0:
        return (slot, out[0], out[1], mean) + tail
    cfg = _config(h.dtype, dev)
    row_tiles = triton.cdiv(num_rows, cfg.block_r)
    # The cap is the program target itself: one row tile alone may take every split it needs to fill the GPU.
    splits, v_per_split = split(row_tiles, vocab_size, cfg.block_v, cfg.programs, splits, cfg.programs)
    part_f = torch.empty(6, splits, num_rows, dtype=torch.float32, device=dev)  # best, z_sel, m, s, sz, st
    part_slot = torch.empty(splits, num_rows, dtype=torch.int64, device=dev)
    _fwd_kernel[(row_tiles, splits)](
        h, w, vocab_ids if vocab_ids is not None else keys, keys,
        part_f[0], part_slot, part_f[1], part_f[2], part_f[3], part_f[4], part_f[5],
        num_rows, vocab_size, hidden, float(inv_temp), v_per_split,
        BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        HAS_VOCAB=vocab_ids is not None, GREEDY=bool(greedy), WANT_MEAN=bool(want_mean), WANT_T=bool(want_tlse),
        UPCAST_DOT=interpreting(), FAST_LOG=not interpreting(),
        PRECISION=precision(h.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block = 32 if interpreting() else 1024
    _merge_kernel[(triton.cdiv(num_rows, block),)](
        part_f[0], part_slot, part_f[1], part_f[2], part_f[3], part_f[4], part_f[5], slot, out[0], out[1], out[2],
        out[3], num_rows, splits, float(inv_temp), BLOCK=block, WANT_MEAN=bool(want_mean), WANT_T=bool(want_tlse),
    )
    return (slot, out[0], out[1], mean) + tail


# ----------------------------------------------------------------------------------------------------------------
# Public function (contract: stp_kernels.torch_chunked_sample_step)
# ----------------------------------------------------------------------------------------------------------------


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, keys: torch.Tensor, inv_temp: float,
            greedy: bool, want_mean: bool, want_tlse: bool = False):
    """(slot int64 [R], z_sel, lse, mean | None float32 [R]) [+ (tlse,) with ``want_tlse``, not greedy]; see
    ``stp_kernels.torch_chunked_sample_step``."""
    vocab_ids = vocab_ids.contiguous() if vocab_ids is not None else None
    return _launch_forward(h.contiguous(), w.contiguous(), vocab_ids, keys.long().contiguous(), float(inv_temp),
                           bool(greedy), bool(want_mean), want_tlse=bool(want_tlse) and not greedy)
