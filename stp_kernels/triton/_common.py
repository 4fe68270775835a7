"""Pieces shared by the Triton kernels of stp_kernels: the fp32 logits tile over a (possibly gathered) vocabulary,
slot -> token ids, launch settings and the split heuristic."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Triton's CPU interpreter: ``tl.dot`` on bf16/fp16 is wrong there, so kernels upcast operands (UPCAST_DOT)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def precision(dtype: torch.dtype) -> str:
    # fp32 operands: full-precision dot (TF32 would cost ~1e-3 relative error); bf16/fp16 ignore this setting.
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Config:
    block_r: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    programs: int  # aim for at least this many programs (outer tiles x splits) per launch


# Interpreter settings: 16/32-wide tiles, so small test shapes still cover ragged edges, several tiles and splits.
INTERPRETER_CONFIG = Config(block_r=16, block_v=32, block_h=16, num_warps=1, num_stages=1, programs=4)


def split(outer_tiles: int, inner_size: int, block: int, programs: int, splits: int | None,
          max_splits: int) -> tuple[int, int]:
    """(number of splits, elements per split) of the inner dimension; every split is non-empty and tile-aligned."""
    inner_tiles = triton.cdiv(inner_size, block)
    if splits is None:
        splits = min(max_splits, triton.cdiv(programs, outer_tiles))
    splits = max(1, min(splits, inner_tiles))
    per_split = triton.cdiv(inner_tiles, splits) * block
    return triton.cdiv(inner_size, per_split), per_split


@triton.jit
def slot_tokens(vocab_ptr, offs_v, mask_v, HAS_VOCAB: tl.constexpr):
    """int64 token id of each vocabulary slot: vocab_ids[v] with a prior, else v (0 past the edge)."""
    if HAS_VOCAB:
        ids = tl.load(vocab_ptr + offs_v, mask=mask_v, other=0).to(tl.int64)
    else:
        ids = tl.where(mask_v, offs_v, 0).to(tl.int64)
    return ids


@triton.jit
def logits_tile(h_ptr, w_ptr, h_rows, w_rows, mask_r, mask_v, H, inv_temp,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """z[BLOCK_R, BLOCK_V] = <h[r], W[sel(v)]> * inv_temp in fp32; -inf in vocabulary columns past the edge.

    ``h_rows`` / ``w_rows`` are int64 element offsets of each row's start (row index * H).
    """
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        offs_h = k + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h_t = tl.load(h_ptr + h_rows[:, None] + offs_h[None, :], mask=mask_r[:, None] & mask_h[None, :], other=0.0)
        w_t = tl.load(w_ptr + w_rows[:, None] + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST_DOT:
            h_t = h_t.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(h_t, tl.trans(w_t), acc, input_precision=PRECISION)
    z = acc * inv_temp
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.jit
def tempered_sum(z, m, st, inv_temp):
    """Fold tile z (-inf where invalid) into each row's running sum st = sum exp((z - m) * inv_temp) of the TEMPERED
    logits, where m is the running max of the untempered z BEFORE this tile (``online_lse`` updates it after):
    max(z * inv_temp) = max(z) * inv_temp for inv_temp > 0, so one running max serves both sums. Returns st."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    return st * tl.exp((m - m_new) * inv_temp) + tl.sum(tl.exp((z - m_new[:, None]) * inv_temp), axis=1)


@triton.jit
def online_lse(z, valid, m, s, sz, WANT_MEAN: tl.constexpr):
    """Fold a logits tile z [BLOCK_R, BLOCK_C] (-inf where not ``valid`` [BLOCK_C]) into each row's running max m,
    sum exp s and, with WANT_MEAN, sum exp * z (invalid columns add 0 there, never 0 * -inf). m must stay finite:
    every tile holds at least one valid column. Returns the updated (m, s, sz)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)  # exp(-inf) = 0 on the first tile
    e = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    if WANT_MEAN:
        sz = sz * alpha + tl.sum(e * tl.where(valid[None, :], z, 0.0), axis=1)
    return m_new, s, sz
