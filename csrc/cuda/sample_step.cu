// CUDA kernels of sample_step (contract: sample_step.h and stp_kernels/torch_chunked_sample_step.py). No torch
// headers.
//
// Design: deliberately simple, since it is checked for correctness by reading and by the standalone test rather
// than tuned. One SIMT tiled product for every dtype: operands are converted to float32 while they are copied to
// shared memory, so the products are plain fp32 FMAs (no tensor cores) summed in increasing k by each thread.
//   fwd_partial  grid (row tiles x, vocabulary splits y), 256 threads. A block owns BM = 64 rows and walks the
//                BN = 64-slot vocabulary tiles of its split. Per tile:
//                  1. token ids of the tile's slots (and mix32 of each) -> shared memory;
//                  2. z[BM, BN] = h[rows] @ w[tokens]^T: BK = 32-wide k steps, single-buffered (load, barrier,
//                     multiply, barrier); thread (ty, tx) of a 16 x 16 grid owns z(ty + 16 i, tx + 16 j), i, j < 4;
//                  3. z -> shared memory; warp w handles rows 8w .. 8w + 7, lane l the columns l and l + 32:
//                     score = z * inv_temp + gumbel (or z), a warp argmax over (score, column) with ties to the
//                     lower column, a warp max and sum of exp for the online log-sum-exp (kMean: also the sum of
//                     exp * z for the mean logit); lane `row % 8` of the warp keeps the row's running (best, slot,
//                     z_sel, m, s[, sz]) in registers and replaces the best only on a strictly greater score (an
//                     earlier tile keeps ties).
//                Writes one partial per (split, row).
//   fwd_merge    one thread per row folds the split partials in split order 0..S-1 (strictly greater again);
//                mean = sum_s sz_s e^{m_s - M} / sum_s s_s e^{m_s - M}.
// Determinism: no atomics; every output element has one writer; reductions run in a fixed order; the plan
// depends on the shapes only. z[r, v] is computed by the same thread arithmetic whatever the split plan, so the
// argmax (slot, z_sel) does not depend on the plan either; lse can differ in the last bits between plans.
#include "sample_step.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"

#include <cmath>
#include <cstdint>

namespace stp_ss {
namespace {

using stp_cuda::kFull;
using stp_cuda::to_float;
using stp_cuda::warp_max;
using stp_cuda::warp_sum;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64, BN = 64, BK = 32;                 // block tile: rows x slots x hidden step
constexpr int kTM = BM / 16, kTN = BN / 16;              // outputs per thread: kTM x kTN
constexpr int kRowsPerWarp = BM / kWarps;                // epilogue: rows per warp
constexpr int kColsPerLane = BN / 32;                    // epilogue: columns per lane
constexpr int kLoadsPerThread = BM * BK / kThreads;      // elements of each operand tile per thread per k step
constexpr int kNoCol = BN;                               // "no column yet" (larger than every real column)
// Aim for this many blocks (row tiles x vocabulary splits): a few waves at 2 blocks per SM on 132 SMs.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxSplits = 65535;                    // grid.y limit
static_assert(BM == BN, "operand tiles share the load loop (row o of A and slot o of B)");
static_assert((BM * BK) % kThreads == 0, "tile elements must divide evenly among the threads");
static_assert(kRowsPerWarp <= 32 && BN % 32 == 0, "epilogue layout");

__host__ __device__ inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }


// lowbias32 (reference.mix32): uint32 multiplies wrap mod 2^32, shifts of unsigned values are logical.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// reference.counter_uniform / counter_gumbel for row key `key` and tok_mix = mix32(token id).
// (bits >> 9) < 2^23 converts exactly, + 0.5 and * 2^-23 are exact: u is the reference's float32 bit for bit and
// lies in [2^-24, 1 - 2^-24], strictly inside (0, 1), so the noise is finite (24 bits would round up to 1.0).
__device__ __forceinline__ float gumbel(uint32_t key, uint32_t tok_mix) {
  const uint32_t bits = mix32(key ^ tok_mix);
  const float u = (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
  return -logf(-logf(u));  // accurate logf (no fast-math), u in (0, 1): finite
}

// Warp argmax over (score, col) pairs: the larger score wins, equal scores go to the lower column. A total order
// (for non-NaN scores), so every lane ends with the same winner; z rides along with its column.
__device__ __forceinline__ void warp_argmax(float& score, int& col, float& z) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float os = __shfl_xor_sync(kFull, score, o);
    const int oc = __shfl_xor_sync(kFull, col, o);
    const float oz = __shfl_xor_sync(kFull, z, o);
    if (os > score || (os == score && oc < col)) {
      score = os;
      col = oc;
      z = oz;
    }
  }
}

struct FwdArgs {
  const void* h;             // [R, H]
  const void* w;             // [V, H]
  const int64_t* vocab_ids;  // [Vs] or nullptr
  const int64_t* keys;       // [R]
  int64_t R, H, Vs;
  float inv_temp;
  int64_t tiles_per_split;
  int64_t n_vtiles;
  float* part_best;          // [S, R] best score of the split
  int64_t* part_slot;        // [S, R] its slot (first maximal)
  float* part_zsel;          // [S, R] z at that slot
  float* part_m;             // [S, R] max z over the split
  float* part_s;             // [S, R] sum exp(z - part_m)
  float* part_sz;            // [S, R] sum exp(z - part_m) * z (kMean only)
};

template <typename T, bool kGreedy, bool kMean>
__global__ void __launch_bounds__(kThreads, 2) fwd_partial_kernel(FwdArgs a) {
  __shared__ float As[BK][BM + 1];    // As[k][m] = h[m0 + m, k0 + k]   (+1: conflict-free transposed stores)
  __shared__ float Bs[BK][BN + 1];    // Bs[k][n] = w[tok(n0 + n), k0 + k]
  __shared__ float Cs[BM][BN + 1];    // z tile
  __shared__ int64_t s_tok[BN];       // token id of each slot of the tile (0 past the split's end)
  __shared__ uint32_t s_tok_mix[BN];  // mix32(token id)
  __shared__ uint32_t s_key[BM];      // low 32 bits of keys[row]

  const T* h = static_cast<const T*>(a.h);
  const T* w = static_cast<const T*>(a.w);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int ty = tid / 16, tx = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = min(t_begin + a.tiles_per_split, a.n_vtiles);
  const int64_t v_end = min(t_end * BN, a.Vs);  // one past the split's last slot

  for (int i = tid; i < BM; i += kThreads) {
    s_key[i] = m0 + i < a.R ? static_cast<uint32_t>(a.keys[m0 + i]) : 0u;  // truncation: the uint32 value
  }

  // Running state of row warp * kRowsPerWarp + lane, held by lanes < kRowsPerWarp.
  float run_best = -INFINITY, run_zsel = 0.f, run_m = -INFINITY, run_s = 0.f, run_sz = 0.f;
  int64_t run_slot = -1;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n0 = t * BN;
    for (int i = tid; i < BN; i += kThreads) {
      const int64_t v = n0 + i;
      const int64_t tok = v < v_end ? (a.vocab_ids != nullptr ? a.vocab_ids[v] : v) : 0;
      s_tok[i] = tok;
      s_tok_mix[i] = mix32(static_cast<uint32_t>(tok));
    }
    __syncthreads();  // s_tok (and s_key) visible; the previous tile's epilogue is done with Cs

    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;

    for (int64_t k0 = 0; k0 < a.H; k0 += BK) {
#pragma unroll
      for (int c = 0; c < kLoadsPerThread; ++c) {
        const int idx = tid + c * kThreads;
        const int o = idx / BK, k = idx % BK;  // consecutive threads: consecutive k of one row (coalesced)
        const int64_t gk = k0 + k;
        const bool k_in = gk < a.H;
        const int64_t r = m0 + o;
        As[k][o] = (k_in && r < a.R) ? to_float(h[r * a.H + gk]) : 0.f;
        Bs[k][o] = (k_in && n0 + o < v_end) ? to_float(w[s_tok[o] * a.H + gk]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < BK; ++kk) {
        float fa[kTM], fb[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) fa[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) fb[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();  // As / Bs are overwritten by the next k step
    }
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) Cs[ty + 16 * i][tx + 16 * j] = acc[i][j];
    __syncthreads();

    for (int lr = 0; lr < kRowsPerWarp; ++lr) {
      const int row = warp * kRowsPerWarp + lr;
      if (m0 + row >= a.R) break;  // warp-uniform
      const uint32_t key = s_key[row];
      float z[kColsPerLane];
      float best = -INFINITY, best_z = 0.f, zmax = -INFINITY;
      int best_col = kNoCol;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int n = lane + 32 * j;  // increasing n: strict > keeps this lane's first maximal column
        const bool valid = n0 + n < v_end;
        z[j] = valid ? Cs[row][n] : -INFINITY;
        zmax = fmaxf(zmax, z[j]);
        if (valid) {
          float score = z[j];
          if (!kGreedy) score = __fadd_rn(__fmul_rn(z[j], a.inv_temp), gumbel(key, s_tok_mix[n]));
          if (best_col == kNoCol || score > best) {
            best = score;
            best_col = n;
            best_z = z[j];
          }
        }
      }
      warp_argmax(best, best_col, best_z);  // every tile holds a valid column: best_col < BN
      zmax = warp_max(zmax);
      const float m_old = __shfl_sync(kFull, run_m, lr);
      const float m_new = fmaxf(m_old, zmax);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // guards -inf - -inf
      float se = 0.f, sze = 0.f;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const float e = expf(z[j] - m_ref);  // 0 for excluded columns
        se += e;
        if (kMean && z[j] != -INFINITY) sze = fmaf(e, z[j], sze);  // not 0 * -inf = NaN
      }
      se = warp_sum(se);
      if (kMean) sze = warp_sum(sze);
      if (lane == lr) {
        const float scale = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        run_s = run_s * scale + se;
        if (kMean) run_sz = run_sz * scale + sze;
        run_m = m_new;
        if (run_slot < 0 || best > run_best) {  // strict: an earlier tile keeps ties
          run_best = best;
          run_slot = n0 + best_col;
          run_zsel = best_z;
        }
      }
    }
    __syncthreads();  // Cs, s_tok are rewritten by the next tile
  }

  if (lane < kRowsPerWarp) {
    const int64_t r = m0 + warp * kRowsPerWarp + lane;
    if (r < a.R) {
      const int64_t o = split * a.R + r;
      a.part_best[o] = run_best;
      a.part_slot[o] = run_slot;
      a.part_zsel[o] = run_zsel;
      a.part_m[o] = run_m;
      a.part_s[o] = run_s;
      if (kMean) a.part_sz[o] = run_sz;
    }
  }
}

// slot / z_sel: the first split (in order 0..S-1) holding the largest best score; lse = M + log sum_s s_s e^{m_s - M};
// mean (mean_out set) = sum_s sz_s e^{m_s - M} / sum_s s_s e^{m_s - M}.
__global__ void __launch_bounds__(kThreads) fwd_merge_kernel(const float* part_best, const int64_t* part_slot,
                                                             const float* part_zsel, const float* part_m,
                                                             const float* part_s, const float* part_sz,
                                                             int64_t num_splits, int64_t R, int64_t* slot_out,
                                                             float* z_sel_out, float* lse_out, float* mean_out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  float best = -INFINITY, z_sel = 0.f, m = -INFINITY;
  int64_t slot = -1;
  for (int64_t s = 0; s < num_splits; ++s) {
    const int64_t o = s * R + r;
    const float b = part_best[o];
    if (slot < 0 || b > best) {
      best = b;
      slot = part_slot[o];
      z_sel = part_zsel[o];
    }
    m = fmaxf(m, part_m[o]);
  }
  const float m_ref = m == -INFINITY ? 0.f : m;
  float sum = 0.f, sum_z = 0.f;
  for (int64_t s = 0; s < num_splits; ++s) {
    const float e = expf(part_m[s * R + r] - m_ref);
    sum += part_s[s * R + r] * e;
    if (mean_out != nullptr) sum_z += part_sz[s * R + r] * e;
  }
  slot_out[r] = slot;
  z_sel_out[r] = z_sel;
  lse_out[r] = m + logf(sum);
  if (mean_out != nullptr) mean_out[r] = sum_z / sum;
}

struct Plan {
  int64_t row_tiles = 0, n_vtiles = 0, splits = 0, tiles_per_split = 0;
};

// Shapes (and the test override) only: identical plans, hence identical results, on every GPU.
Plan make_plan(const SsParams& p) {
  Plan plan;
  plan.row_tiles = ceil_div(p.R, BM);
  plan.n_vtiles = ceil_div(p.Vs, BN);
  int64_t splits = p.splits > 0 ? p.splits : ceil_div(kTargetBlocks, plan.row_tiles);
  splits = splits < plan.n_vtiles ? splits : plan.n_vtiles;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits > 1 ? splits : 1;
  plan.tiles_per_split = ceil_div(plan.n_vtiles, splits);
  plan.splits = ceil_div(plan.n_vtiles, plan.tiles_per_split);  // every split non-empty
  return plan;
}

bool problem_ok(const SsParams& p) {
  if (p.h == nullptr || p.w == nullptr || p.keys == nullptr) return false;
  if (p.R < 0 || p.H < 1 || p.V < 1 || p.Vs < 1) return false;
  if (p.vocab_ids == nullptr && p.Vs != p.V) return false;
  if (p.dtype != SsDtype::kFloat32 && p.dtype != SsDtype::kBFloat16 && p.dtype != SsDtype::kFloat16) return false;
  if (!p.greedy && !std::isfinite(p.inv_temp)) return false;
  if (ceil_div(p.R, BM) > INT32_MAX || ceil_div(p.R, kThreads) > INT32_MAX) return false;  // grid.x
  return true;
}

template <typename T>
cudaError_t forward_impl(const SsParams& p, cudaStream_t stream) {
  const Plan plan = make_plan(p);
  const int64_t n = plan.splits * p.R;
  // Workspace: slots (int64) first, then four (with the mean five) float arrays.
  int64_t* part_slot = static_cast<int64_t*>(p.workspace);
  float* part_best = reinterpret_cast<float*>(part_slot + n);
  float* part_zsel = part_best + n;
  float* part_m = part_zsel + n;
  float* part_s = part_m + n;
  float* part_sz = p.mean_out != nullptr ? part_s + n : nullptr;

  FwdArgs a;
  a.h = p.h;
  a.w = p.w;
  a.vocab_ids = p.vocab_ids;
  a.keys = p.keys;
  a.R = p.R;
  a.H = p.H;
  a.Vs = p.Vs;
  a.inv_temp = p.inv_temp;
  a.tiles_per_split = plan.tiles_per_split;
  a.n_vtiles = plan.n_vtiles;
  a.part_best = part_best;
  a.part_slot = part_slot;
  a.part_zsel = part_zsel;
  a.part_m = part_m;
  a.part_s = part_s;
  a.part_sz = part_sz;
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits));
  const bool mean = p.mean_out != nullptr;
  if (p.greedy) {
    if (mean) {
      fwd_partial_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      fwd_partial_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
    }
  } else if (mean) {
    fwd_partial_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    fwd_partial_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  fwd_merge_kernel<<<static_cast<unsigned>(ceil_div(p.R, kThreads)), kThreads, 0, stream>>>(
      part_best, part_slot, part_zsel, part_m, part_s, part_sz, plan.splits, p.R, p.slot_out, p.z_sel_out,
      p.lse_out, p.mean_out);
  return cudaGetLastError();
}

}  // namespace

size_t ss_forward_workspace_bytes(const SsParams& p) {
  if (!problem_ok(p) || p.R == 0) return 0;
  const Plan plan = make_plan(p);
  const size_t floats = p.mean_out != nullptr ? 5 : 4;
  return size_t(plan.splits) * size_t(p.R) * (sizeof(int64_t) + floats * sizeof(float));
}

cudaError_t ss_forward(const SsParams& p, cudaStream_t stream) {
  if (!problem_ok(p)) return cudaErrorInvalidValue;
  if (p.R == 0) return cudaSuccess;
  if (p.slot_out == nullptr || p.z_sel_out == nullptr || p.lse_out == nullptr) return cudaErrorInvalidValue;
  const size_t need = ss_forward_workspace_bytes(p);
  if (p.workspace == nullptr || p.workspace_bytes < need) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case SsDtype::kFloat32: return forward_impl<float>(p, stream);
    case SsDtype::kBFloat16: return forward_impl<__nv_bfloat16>(p, stream);
    default: return forward_impl<__half>(p, stream);
  }
}

}  // namespace stp_ss
