// CUDA kernels of masked_logprob (contract: masked_logprob.h and reference.backend_contract). No torch headers.
//
// Design: one block-level tiled GEMM (BlockGemm) used by four kernels.
//   * Operands are row-major matrices in global memory, optionally with rows gathered through vocab_ids. A tile
//     is copied global -> registers -> shared memory in 16-byte chunks (scalar loads at ragged edges or when a
//     row is not 16-byte aligned), zero-filled outside the matrix, double-buffered with one barrier per k step.
//   * bf16 / fp16: nvcuda::wmma 16x16x16 with float accumulators, 128x128x32 tiles, 8 warps of 64x32.
//     float32: SIMT fp32 FMAs, 64x64x16 tiles, 4x4 outputs per thread.
//   * The accumulator tile is stored to shared memory (aliasing the staging buffers) and a kernel-specific
//     epilogue reads it there, so epilogues never depend on the wmma fragment layout.
// Kernels:
//   fwd_partial  grid (row tiles, vocab splits): a block owns BM rows and walks the vocabulary tiles of its split,
//                keeping an online (max, sum exp, sum exp*z) per row in registers; writes per-split partials.
//                The block whose tile holds a row's target writes that row's target logit (exactly one writer).
//   fwd_merge    one thread per row folds the split partials in split order 0..S-1 -> lse, mean.
//   bwd_dz       per vocabulary chunk: recomputes z for a [BM, BN] tile and writes inv_temp * dz, rounded once to
//                the input dtype, to a [R, chunk] scratch buffer.
//   bwd_dh       dh[R, H] (+)= dz_chunk @ w[sel(chunk)]   (float32; first chunk stores, later chunks add, in chunk
//                order)
//   bwd_dw       dw[chunk, H] = dz_chunk^T @ h, written in the input dtype (float32 accumulation over all rows in
//                registers, one rounding at the store: no float32 [Vs, H] buffer exists anywhere)
// Flops: 2 R*H*Vs (forward) and 6 R*H*Vs (backward with both gradients): the matmul floor of this structure.
// Determinism: no atomics anywhere; every output element has one writer per launch; launches are stream-ordered.
#include "masked_logprob.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace stp_mlp {
namespace {

using namespace nvcuda;
using stp_cuda::kFull;
using stp_cuda::to_float;
using stp_cuda::warp_max;
using stp_cuda::warp_sum;

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
// Forward: aim for this many blocks (row tiles x vocabulary splits): ~4 waves at 2 blocks/SM on 132 SMs.
constexpr int64_t kFwdTargetBlocks = 1024;
// Backward: the dz scratch buffer holds at most this many elements ([R, chunk]): 128 MiB in float32, 64 MiB in
// bf16 / fp16.
constexpr int64_t kDzBudgetElems = int64_t(1) << 25;
// Backward chunks are multiples of this (a multiple of every BM and BN below) and at most kMaxChunk slots,
// which keeps grid.y = chunk / BN under 65535.
constexpr int64_t kChunkQuantum = 128;
constexpr int64_t kMaxChunk = int64_t(1) << 21;
constexpr int64_t kMaxHidden = int64_t(1) << 21;  // grid.y = ceil(H / BN) of the dh / dw kernels

constexpr size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
constexpr size_t max_size(size_t x, size_t y) { return x > y ? x : y; }
__host__ __device__ inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename T> struct TileConfig;
template <> struct TileConfig<float> { static constexpr int BM = 64, BN = 64, BK = 16; };
template <> struct TileConfig<__nv_bfloat16> { static constexpr int BM = 128, BN = 128, BK = 32; };
template <> struct TileConfig<__half> { static constexpr int BM = 128, BN = 128, BK = 32; };

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// A row-major matrix L(o, i), o in [0, n_outer), i in [0, n_inner): element i of global row
// row(o) = ids ? ids[row_off + o] : row_off + o, at ptr + row(o) * ld + i. Reads outside are zeros.
struct Operand {
  const void* ptr;
  int64_t ld;           // elements between consecutive global rows
  const int64_t* ids;   // optional row gather (vocab_ids)
  int64_t row_off;
  int64_t n_outer;
  int64_t n_inner;
  bool vec_ok;          // ptr 16-byte aligned and ld a multiple of 16 bytes: full chunks may use 16-byte loads
};

template <typename T>
Operand make_operand(const void* ptr, int64_t ld, const int64_t* ids, int64_t row_off, int64_t n_outer,
                     int64_t n_inner) {
  const int64_t vec = 16 / static_cast<int64_t>(sizeof(T));
  const bool vec_ok = (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && (ld % vec == 0);
  return Operand{ptr, ld, ids, row_off, n_outer, n_inner, vec_ok};
}

// Copies the OUTER x INNER tile of an Operand starting at (o0, i0) into shared memory laid out [OUTER][kLd].
// load() issues the global reads into registers, store() writes them to shared memory, so the next tile's loads
// can be in flight while the current one is multiplied. i0 is always a multiple of the chunk width kVec.
template <typename T, int OUTER, int INNER>
struct TileLoader {
  using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kLd = INNER + kVec;                        // +16 bytes of padding per row
  static constexpr int kChunksPerRow = INNER / kVec;
  static constexpr int kPerThread = OUTER * kChunksPerRow / kThreads;
  static constexpr int kSmemElems = OUTER * kLd;
  static_assert(INNER % kVec == 0, "tile width must be a whole number of 16-byte chunks");
  static_assert((OUTER * kChunksPerRow) % kThreads == 0, "tile chunks must divide evenly among the threads");

  uint4 regs[kPerThread];

  __device__ __forceinline__ void load(const Operand& op, int64_t o0, int64_t i0) {
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int idx = static_cast<int>(threadIdx.x) + c * kThreads;
      const int64_t go = o0 + idx / kChunksPerRow;
      const int64_t gi = i0 + (idx % kChunksPerRow) * kVec;
      union {
        uint4 v;
        Bits e[kVec];
      } u;
      u.v = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0.0 in every supported dtype
      if (go < op.n_outer && gi < op.n_inner) {
        const int64_t row = op.ids != nullptr ? op.ids[op.row_off + go] : op.row_off + go;
        const Bits* src = static_cast<const Bits*>(op.ptr) + row * op.ld + gi;
        if (op.vec_ok && gi + kVec <= op.n_inner) {
          u.v = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (gi + e < op.n_inner) u.e[e] = src[e];
          }
        }
      }
      regs[c] = u.v;
    }
  }

  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int idx = static_cast<int>(threadIdx.x) + c * kThreads;
      const int o = idx / kChunksPerRow;
      const int i = (idx % kChunksPerRow) * kVec;
      *reinterpret_cast<uint4*>(smem + o * kLd + i) = regs[c];
    }
  }
};

// Tensor-core block product for bf16 / fp16. Shared tiles: A is [m][k] (A_KM false) or [k][m] (A_KM true) with
// row stride LDA; B is [n][k] (B_KN false) or [k][n] (B_KN true) with row stride LDB. In wmma terms A(m, k) is a
// row_major matrix_a for [m][k] and col_major for [k][m]; B(k, n) is col_major matrix_b for [n][k] and row_major
// for [k][n]. Fragment pointers are 32-byte aligned: every row stride is a multiple of 16 bytes and fragment rows
// start at multiples of 16.
template <typename T, bool A_KM, bool B_KN, int LDA, int LDB>
struct WmmaMma {
  using Cfg = TileConfig<T>;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kWM = Cfg::BM / kWarpsM, kWN = Cfg::BN / kWarpsN;  // 64 x 32 per warp
  static constexpr int kFM = kWM / 16, kFN = kWN / 16;
  static_assert(kWarpsM * kWarpsN == kWarps, "warp grid must use every warp");
  static_assert(kWM % 16 == 0 && kWN % 16 == 0 && Cfg::BK % 16 == 0, "tiles must be multiples of 16");
  using LayoutA = typename std::conditional<A_KM, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<B_KN, wmma::row_major, wmma::col_major>::type;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFM][kFN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void step(const T* sa, const T* sb) {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += 16) {
      // All B fragments, then one A fragment at a time: fewer live registers than holding every A fragment.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[kFN];
#pragma unroll
      for (int j = 0; j < kFN; ++j) {
        const int n = wn * kWN + j * 16;
        wmma::load_matrix_sync(fb[j], B_KN ? sb + kk * LDB + n : sb + n * LDB + kk, LDB);
      }
#pragma unroll
      for (int i = 0; i < kFM; ++i) {
        const int m = wm * kWM + i * 16;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
        wmma::load_matrix_sync(fa, A_KM ? sa + kk * LDA + m : sa + m * LDA + kk, LDA);
#pragma unroll
        for (int j = 0; j < kFN; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
      }
    }
  }

  // cs: [BM][LDC] floats, cs[m][n] = C(m, n).
  template <int LDC>
  __device__ __forceinline__ void store(float* cs) const {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j)
        wmma::store_matrix_sync(cs + (wm * kWM + i * 16) * LDC + wn * kWN + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
  }
};

// SIMT fp32 block product: a 16 x 16 thread grid, thread (ty, tx) owns C(ty + 16 i, tx + 16 j), i, j < 4, and
// sums k in increasing order (fixed order: deterministic).
template <bool A_KM, bool B_KN, int LDA, int LDB>
struct SimtMma {
  using Cfg = TileConfig<float>;
  static constexpr int kTM = Cfg::BM / 16, kTN = Cfg::BN / 16;
  static_assert(kThreads == 256, "SimtMma assumes a 16 x 16 thread grid");

  float acc[kTM][kTN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* sa, const float* sb) {
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
#pragma unroll
    for (int k = 0; k < Cfg::BK; ++k) {
      float av[kTM], bv[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int m = ty + 16 * i;
        av[i] = A_KM ? sa[k * LDA + m] : sa[m * LDA + k];
      }
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int n = tx + 16 * j;
        bv[j] = B_KN ? sb[k * LDB + n] : sb[n * LDB + k];
      }
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  template <int LDC>
  __device__ __forceinline__ void store(float* cs) const {
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) cs[(ty + 16 * i) * LDC + tx + 16 * j] = acc[i][j];
  }
};

// C[m][n] = sum_{k < K} A(m0 + m, k) * B(k, n0 + n) for a BM x BN tile, left in shared memory as floats.
//   A_KM false: A(m, k) = a.L(m, k);  true: A(m, k) = a.L(k, m).
//   B_KN false: B(k, n) = b.L(n, k);  true: B(k, n) = b.L(k, n).
// The Operand's extent along k must be K, so both operands are zero past K and ragged k tiles add nothing.
// Shared memory: [stage 0: A, B][stage 1: A, B], later reused for C [BM][kLdc]. Preconditions: every thread may
// overwrite the region (the caller synchronised after its last read of C). Postcondition: C complete and visible.
template <typename T, bool A_KM, bool B_KN>
struct BlockGemm {
  using Cfg = TileConfig<T>;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  using LoadA = typename std::conditional<A_KM, TileLoader<T, BK, BM>, TileLoader<T, BM, BK>>::type;
  using LoadB = typename std::conditional<B_KN, TileLoader<T, BK, BN>, TileLoader<T, BN, BK>>::type;
  using Mma = typename std::conditional<std::is_same<T, float>::value,
                                        SimtMma<A_KM, B_KN, LoadA::kLd, LoadB::kLd>,
                                        WmmaMma<T, A_KM, B_KN, LoadA::kLd, LoadB::kLd>>::type;
  static constexpr int kLdc = BN + 4;  // floats; multiple of 4 as wmma::store_matrix_sync requires
  static constexpr size_t kBytesA = round_up(LoadA::kSmemElems * sizeof(T), 128);
  static constexpr size_t kBytesB = round_up(LoadB::kSmemElems * sizeof(T), 128);
  static constexpr size_t kStageBytes = kBytesA + kBytesB;
  static constexpr size_t kBytes = round_up(max_size(2 * kStageBytes, size_t(BM) * kLdc * sizeof(float)), 128);

  __device__ __forceinline__ static void fetch(LoadA& la, LoadB& lb, const Operand& a, const Operand& b, int64_t m0,
                                               int64_t n0, int64_t k0) {
    if (A_KM) la.load(a, k0, m0); else la.load(a, m0, k0);
    if (B_KN) lb.load(b, k0, n0); else lb.load(b, n0, k0);
  }

  __device__ static void run(const Operand& a, const Operand& b, int64_t m0, int64_t n0, int64_t K,
                             unsigned char* smem) {
    // Stage s: A at smem + s * kStageBytes, B right after it (pointer arithmetic, not an indexed array, so
    // nothing spills to local memory).
    auto sa = [smem](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes); };
    auto sb = [smem](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes + kBytesA); };
    LoadA la;
    LoadB lb;
    Mma mma;
    mma.zero();
    const int64_t nt = ceil_div(K, BK);
    fetch(la, lb, a, b, m0, n0, 0);
    la.store(sa(0));
    lb.store(sb(0));
    __syncthreads();
    for (int64_t kt = 0; kt < nt; ++kt) {
      const int cur = static_cast<int>(kt & 1);
      const bool more = kt + 1 < nt;
      // Global loads overlap the products below.
      if (more) fetch(la, lb, a, b, m0, n0, (kt + 1) * BK);
      mma.step(sa(cur), sb(cur));
      // Stage cur ^ 1 was last read in iteration kt - 1, which ended with a barrier.
      if (more) {
        la.store(sa(cur ^ 1));
        lb.store(sb(cur ^ 1));
      }
      __syncthreads();
    }
    mma.template store<kLdc>(reinterpret_cast<float*>(smem));  // staging is dead after the last barrier
    __syncthreads();
  }
};

// ------------------------------------------------------------------------------------------------- forward

struct FwdArgs {
  Operand h;             // L(r, k) = h[r, k]
  Operand w;             // L(v, k) = w[sel(v), k]
  const int64_t* tgt;
  int64_t R, Vs, H;
  float inv_temp;
  bool want_mean;
  int64_t tiles_per_split;
  int64_t n_vtiles;
  float* tgt_logit;
  float* part_m;         // [S, R] running max of z over the split
  float* part_s;         // [S, R] sum exp(z - part_m)
  float* part_sz;        // [S, R] sum exp(z - part_m) * z   (written when want_mean)
};

// Block (row tile x, split y). Warp w owns rows w * kRowsPerWarp + l, l < kRowsPerWarp; lane l keeps that row's
// running (m, s, sz) in registers. Per vocabulary tile and row, with tile logits z_v:
//   m' = max(m, max_v z_v);  s' = s e^{m - m'} + sum_v e^{z_v - m'};  sz' = sz e^{m - m'} + sum_v e^{z_v - m'} z_v.
// Slots v >= Vs are excluded (z = -inf, no sz term). Every tile holds at least one valid slot.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fwd_partial_kernel(FwdArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  using G = BlockGemm<T, false, false>;
  constexpr int BM = G::BM, BN = G::BN;
  constexpr int kRowsPerWarp = BM / kWarps;
  constexpr int kColsPerLane = BN / 32;
  static_assert(kRowsPerWarp <= 32 && BN % 32 == 0, "forward epilogue layout");

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t t_begin = split * args.tiles_per_split;
  const int64_t t_end = min(t_begin + args.tiles_per_split, args.n_vtiles);
  const float* cs = reinterpret_cast<const float*>(smem);

  float run_m = -INFINITY, run_s = 0.f, run_sz = 0.f;  // lane l: row warp * kRowsPerWarp + l
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n0 = t * BN;
    G::run(args.h, args.w, m0, n0, args.H, smem);
    for (int lr = 0; lr < kRowsPerWarp; ++lr) {
      const int row = warp * kRowsPerWarp + lr;
      const int64_t r = m0 + row;
      if (r >= args.R) break;  // warp-uniform
      const int64_t tg = args.tgt[r];
      float z[kColsPerLane];
      float tmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int n = lane + 32 * j;
        const bool valid = n0 + n < args.Vs;
        z[j] = valid ? cs[row * G::kLdc + n] * args.inv_temp : -INFINITY;
        tmax = fmaxf(tmax, z[j]);
        if (n0 + n == tg) args.tgt_logit[r] = z[j];  // the one writer of this row's target logit
      }
      tmax = warp_max(tmax);
      const float m_old = __shfl_sync(kFull, run_m, lr);
      const float m_new = fmaxf(m_old, tmax);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // guards -inf - -inf
      float se = 0.f, sze = 0.f;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const float e = __expf(z[j] - m_ref);  // 0 for excluded slots
        se += e;
        if (args.want_mean && z[j] != -INFINITY) sze += e * z[j];
      }
      se = warp_sum(se);
      if (args.want_mean) sze = warp_sum(sze);
      if (lane == lr) {
        const float scale = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
        run_s = run_s * scale + se;
        run_sz = run_sz * scale + sze;
        run_m = m_new;
      }
    }
    __syncthreads();  // all reads of C done before the next run() overwrites it
  }
  if (lane < kRowsPerWarp) {
    const int64_t r = m0 + warp * kRowsPerWarp + lane;
    if (r < args.R) {
      const int64_t o = split * args.R + r;
      args.part_m[o] = run_m;
      args.part_s[o] = run_s;
      if (args.want_mean) args.part_sz[o] = run_sz;
    }
  }
}

// lse = M + log sum_s s_s e^{m_s - M}, mean = sum_s sz_s e^{m_s - M} / sum_s s_s e^{m_s - M}, M = max_s m_s,
// summed in split order.
__global__ void __launch_bounds__(kThreads, 2) fwd_merge_kernel(const float* part_m, const float* part_s,
                                                             const float* part_sz, int64_t num_splits, int64_t R,
                                                             int64_t Vs, const int64_t* tgt, float* lse,
                                                             float* mean, float* tgt_logit) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  float m = -INFINITY;
  for (int64_t s = 0; s < num_splits; ++s) m = fmaxf(m, part_m[s * R + r]);
  const float m_ref = m == -INFINITY ? 0.f : m;
  float sum = 0.f, sum_z = 0.f;
  for (int64_t s = 0; s < num_splits; ++s) {
    const float e = expf(part_m[s * R + r] - m_ref);
    sum += part_s[s * R + r] * e;
    if (mean != nullptr) sum_z += part_sz[s * R + r] * e;
  }
  lse[r] = m + logf(sum);
  if (mean != nullptr) mean[r] = sum_z / sum;
  const int64_t tg = tgt[r];
  if (tg < 0 || tg >= Vs) tgt_logit[r] = NAN;  // no partial kernel wrote it: make the bad target visible
}

// ------------------------------------------------------------------------------------------------ backward
//
// Derivation. z[r, v] = inv_temp <h[r], w[sel(v)]>, p = softmax_v(z), mean[r] = sum_v p z. For the outputs
// logp = z_t - lse, lse and entropy = lse - sum_v p_v z_v:
//   d lse / d z_v = p_v;   d logp / d z_v = [v == t] - p_v;
//   d (sum_u p_u z_u) / d z_v = p_v + sum_u z_u p_u ([u == v] - p_v) = p_v + p_v z_v - p_v mean,
//   so d entropy / d z_v = p_v - (p_v + p_v z_v - p_v mean) = p_v (mean - z_v).
// With upstream g_logp, g_lse, g_ent:
//   dz_v = g_logp [v == t] + p_v (g_lse - g_logp + g_ent mean - g_ent z_v) = g_tgt [v == t] + p_v (a - b z_v)
// (g_tgt = g_logp, a = g_lse - g_logp + g_ent mean, b = g_ent: the caller forms them). By the chain rule through
// z = inv_temp h w^T:
//   dh[r] = inv_temp sum_v dz[r, v] w[sel(v)],   dw[v] = inv_temp sum_r dz[r, v] h[r].
// bwd_dz recomputes z tile by tile and stores dzs = inv_temp * dz rounded once to the input dtype (float32: as is);
// bwd_dh and bwd_dw are the two products with float32 accumulation (tensor cores for bf16 / fp16). One rounding of
// dz is what torch's own bf16 backward does (it casts the logits' gradient to bf16) and what Liger-Kernel and
// cut-cross-entropy do; the tests hold every gradient element within torch's own bf16 error plus 1e-2.

struct DzArgs {
  Operand h;           // L(r, k) = h[r, k]
  Operand w;           // L(v, k) = w[sel(chunk0 + v), k], v < vc
  const int64_t* tgt;
  const float* lse;
  const float* g_tgt;
  const float* a;
  const float* b;      // nullable
  int64_t R, H, chunk0, vc, ld;
  float inv_temp;
  void* dz;            // [R, ld] of T; columns [vc, ceil(vc / BN) * BN) get zeros
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) bwd_dz_kernel(DzArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  using G = BlockGemm<T, false, false>;
  constexpr int BM = G::BM, BN = G::BN;
  // Per-row inputs live past the GEMM region; written here, read after run()'s barriers.
  float* s_lse = reinterpret_cast<float*>(smem + G::kBytes);
  float* s_g = s_lse + BM;
  float* s_a = s_g + BM;
  float* s_b = s_a + BM;
  int64_t* s_t = reinterpret_cast<int64_t*>(s_b + BM);  // 8-byte aligned: G::kBytes and 4 * BM * 4 are

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;  // chunk-local slot
  for (int i = static_cast<int>(threadIdx.x); i < BM; i += kThreads) {
    const int64_t r = m0 + i;
    const bool in = r < args.R;
    s_lse[i] = in ? args.lse[r] : 0.f;
    s_g[i] = in ? args.g_tgt[r] : 0.f;
    s_a[i] = in ? args.a[r] : 0.f;
    s_b[i] = in && args.b != nullptr ? args.b[r] : 0.f;
    s_t[i] = in ? args.tgt[r] : -1;
  }
  G::run(args.h, args.w, m0, n0, args.H, smem);
  const float* cs = reinterpret_cast<const float*>(smem);
  T* dz = static_cast<T*>(args.dz);
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, n = idx % BN;
    const int64_t r = m0 + row;
    if (r >= args.R) continue;
    const int64_t col = n0 + n;
    float d = 0.f;
    if (col < args.vc) {
      const float z = cs[row * G::kLdc + n] * args.inv_temp;
      const float p = __expf(z - s_lse[row]);
      d = p * (s_a[row] - s_b[row] * z);
      if (args.chunk0 + col == s_t[row]) d += s_g[row];
      d *= args.inv_temp;
    }
    dz[r * args.ld + col] = from_float<T>(d);
  }
}

struct DhArgs {
  Operand dz;          // L(r, v) = dzs[r, v], v < vc
  Operand w;           // L(v, j) = w[sel(chunk0 + v), j]
  int64_t R, H, vc;
  bool accumulate;     // false for the first chunk: store instead of add
  float* dh;           // [R, H]
};

// dh[r, j] (+)= sum_{v < vc} dzs[r, v] w[sel(chunk0 + v), j]: M = rows, N = hidden, K = chunk slots.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) bwd_dh_kernel(DhArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  using G = BlockGemm<T, false, true>;
  constexpr int BM = G::BM, BN = G::BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  G::run(args.dz, args.w, m0, n0, args.vc, smem);
  const float* cs = reinterpret_cast<const float*>(smem);
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, n = idx % BN;
    const int64_t r = m0 + row, j = n0 + n;
    if (r >= args.R || j >= args.H) continue;
    const int64_t o = r * args.H + j;
    const float c = cs[row * G::kLdc + n];
    args.dh[o] = args.accumulate ? args.dh[o] + c : c;
  }
}

struct DwArgs {
  Operand dz;          // L(r, v) = dzs[r, v]: read transposed (A(m = v, k = r))
  Operand h;           // L(r, j) = h[r, j]
  int64_t R, H, chunk0, vc;
  void* dw;            // [Vs, H] of T
};

// dw[chunk0 + v, j] = sum_r dzs[r, v] h[r, j]: M = chunk slots, N = hidden, K = rows. The float32 sum over every
// row is complete in the block, so it is rounded to T once, at the store.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) bwd_dw_kernel(DwArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  using G = BlockGemm<T, true, true>;
  constexpr int BM = G::BM, BN = G::BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  G::run(args.dz, args.h, m0, n0, args.R, smem);
  const float* cs = reinterpret_cast<const float*>(smem);
  T* dw = static_cast<T*>(args.dw);
  for (int idx = static_cast<int>(threadIdx.x); idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, n = idx % BN;
    const int64_t v = m0 + row, j = n0 + n;
    if (v >= args.vc || j >= args.H) continue;
    dw[(args.chunk0 + v) * args.H + j] = from_float<T>(cs[row * G::kLdc + n]);
  }
}

// ------------------------------------------------------------------------------------------------------ host

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

struct FwdPlan {
  int64_t n_rtiles, n_vtiles, tiles_per_split, splits;
};

// Shape-only plan (same on every GPU, so results are bitwise reproducible across machines with the same build).
template <typename T>
FwdPlan fwd_plan(const MlpParams& p) {
  using Cfg = TileConfig<T>;
  FwdPlan plan;
  plan.n_rtiles = ceil_div(p.R, Cfg::BM);
  plan.n_vtiles = ceil_div(p.Vs, Cfg::BN);
  int64_t want = p.fwd_splits > 0 ? p.fwd_splits : ceil_div(kFwdTargetBlocks, plan.n_rtiles > 0 ? plan.n_rtiles : 1);
  want = want < 1 ? 1 : (want > plan.n_vtiles ? plan.n_vtiles : want);
  plan.tiles_per_split = ceil_div(plan.n_vtiles, want);
  plan.splits = ceil_div(plan.n_vtiles, plan.tiles_per_split);  // no empty split
  return plan;
}

int64_t bwd_chunk(const MlpParams& p) {
  int64_t chunk = p.bwd_vocab_chunk > 0
                      ? ceil_div(p.bwd_vocab_chunk, kChunkQuantum) * kChunkQuantum
                      : kDzBudgetElems / (p.R > 0 ? p.R : 1) / kChunkQuantum * kChunkQuantum;
  if (chunk < kChunkQuantum) chunk = kChunkQuantum;
  const int64_t all = ceil_div(p.Vs, kChunkQuantum) * kChunkQuantum;
  if (chunk > all) chunk = all;
  if (chunk > kMaxChunk) chunk = kMaxChunk;
  return chunk;
}

size_t dtype_size(MlpDtype d) { return d == MlpDtype::kFloat32 ? 4 : 2; }

bool problem_ok(const MlpParams& p) {
  if (p.h == nullptr || p.w == nullptr || p.tgt == nullptr) return false;
  if (p.R < 0 || p.H < 1 || p.H > kMaxHidden || p.V < 1 || p.Vs < 1) return false;
  if (p.vocab_ids == nullptr && p.Vs != p.V) return false;
  if (p.R > INT32_MAX || p.Vs > INT32_MAX) return false;
  return p.dtype == MlpDtype::kFloat32 || p.dtype == MlpDtype::kBFloat16 || p.dtype == MlpDtype::kFloat16;
}

template <typename T>
cudaError_t forward_impl(const MlpParams& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  const FwdPlan plan = fwd_plan<T>(p);
  float* ws = static_cast<float*>(p.workspace);
  FwdArgs args;
  args.h = make_operand<T>(p.h, p.H, nullptr, 0, p.R, p.H);
  args.w = make_operand<T>(p.w, p.H, p.vocab_ids, 0, p.Vs, p.H);
  args.tgt = p.tgt;
  args.R = p.R;
  args.Vs = p.Vs;
  args.H = p.H;
  args.inv_temp = p.inv_temp;
  args.want_mean = p.mean_out != nullptr;
  args.tiles_per_split = plan.tiles_per_split;
  args.n_vtiles = plan.n_vtiles;
  args.tgt_logit = p.tgt_logit_out;
  args.part_m = ws;
  args.part_s = ws + plan.splits * p.R;
  args.part_sz = ws + 2 * plan.splits * p.R;
  using G = BlockGemm<T, false, false>;
  cudaError_t err = launch(fwd_partial_kernel<T>, dim3(static_cast<unsigned>(plan.n_rtiles),
                                                       static_cast<unsigned>(plan.splits)),
                           G::kBytes, stream, args);
  if (err != cudaSuccess) return err;
  return launch(fwd_merge_kernel, dim3(static_cast<unsigned>(ceil_div(p.R, kThreads))), 0, stream,
                static_cast<const float*>(args.part_m), static_cast<const float*>(args.part_s),
                static_cast<const float*>(args.part_sz), plan.splits, p.R, p.Vs, p.tgt, p.lse_out, p.mean_out,
                p.tgt_logit_out);
}

template <typename T>
cudaError_t backward_impl(const MlpParams& p, cudaStream_t stream) {
  if (p.R == 0 || (p.dh == nullptr && p.dw == nullptr)) return cudaSuccess;
  using Cfg = TileConfig<T>;
  using Gz = BlockGemm<T, false, false>;
  using Gh = BlockGemm<T, false, true>;
  using Gw = BlockGemm<T, true, true>;
  const int64_t chunk = bwd_chunk(p);
  const int64_t n_rtiles = ceil_div(p.R, Cfg::BM);
  const int64_t n_htiles = ceil_div(p.H, Cfg::BN);
  const size_t dz_smem = Gz::kBytes + size_t(Cfg::BM) * (4 * sizeof(float) + sizeof(int64_t));
  for (int64_t c0 = 0; c0 < p.Vs; c0 += chunk) {
    const int64_t vc = p.Vs - c0 < chunk ? p.Vs - c0 : chunk;
    DzArgs dz;
    dz.h = make_operand<T>(p.h, p.H, nullptr, 0, p.R, p.H);
    dz.w = make_operand<T>(p.w, p.H, p.vocab_ids, c0, vc, p.H);
    dz.tgt = p.tgt;
    dz.lse = p.lse;
    dz.g_tgt = p.g_tgt;
    dz.a = p.a;
    dz.b = p.b;
    dz.R = p.R;
    dz.H = p.H;
    dz.chunk0 = c0;
    dz.vc = vc;
    dz.ld = chunk;
    dz.inv_temp = p.inv_temp;
    dz.dz = p.workspace;
    cudaError_t err = launch(bwd_dz_kernel<T>, dim3(static_cast<unsigned>(n_rtiles),
                                                    static_cast<unsigned>(ceil_div(vc, Cfg::BN))),
                             dz_smem, stream, dz);
    if (err != cudaSuccess) return err;
    const Operand dz_op = make_operand<T>(p.workspace, chunk, nullptr, 0, p.R, vc);
    if (p.dh != nullptr) {
      DhArgs dh;
      dh.dz = dz_op;
      dh.w = make_operand<T>(p.w, p.H, p.vocab_ids, c0, vc, p.H);
      dh.R = p.R;
      dh.H = p.H;
      dh.vc = vc;
      dh.accumulate = c0 > 0;
      dh.dh = p.dh;
      err = launch(bwd_dh_kernel<T>, dim3(static_cast<unsigned>(n_rtiles), static_cast<unsigned>(n_htiles)),
                   Gh::kBytes, stream, dh);
      if (err != cudaSuccess) return err;
    }
    if (p.dw != nullptr) {
      DwArgs dw;
      dw.dz = dz_op;
      dw.h = make_operand<T>(p.h, p.H, nullptr, 0, p.R, p.H);
      dw.R = p.R;
      dw.H = p.H;
      dw.chunk0 = c0;
      dw.vc = vc;
      dw.dw = p.dw;
      err = launch(bwd_dw_kernel<T>, dim3(static_cast<unsigned>(ceil_div(vc, Cfg::BM)),
                                          static_cast<unsigned>(n_htiles)),
                   Gw::kBytes, stream, dw);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace

size_t mlp_forward_workspace_bytes(const MlpParams& p) {
  if (!problem_ok(p) || p.R == 0) return 0;
  FwdPlan plan;
  switch (p.dtype) {
    case MlpDtype::kFloat32: plan = fwd_plan<float>(p); break;
    case MlpDtype::kBFloat16: plan = fwd_plan<__nv_bfloat16>(p); break;
    default: plan = fwd_plan<__half>(p); break;
  }
  return size_t(3) * size_t(plan.splits) * size_t(p.R) * sizeof(float);
}

size_t mlp_backward_workspace_bytes(const MlpParams& p) {
  if (!problem_ok(p) || p.R == 0) return 0;
  return size_t(p.R) * size_t(bwd_chunk(p)) * dtype_size(p.dtype);
}

cudaError_t mlp_forward(const MlpParams& p, cudaStream_t stream) {
  if (!problem_ok(p) || p.lse_out == nullptr || p.tgt_logit_out == nullptr) return cudaErrorInvalidValue;
  const size_t need = mlp_forward_workspace_bytes(p);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case MlpDtype::kFloat32: return forward_impl<float>(p, stream);
    case MlpDtype::kBFloat16: return forward_impl<__nv_bfloat16>(p, stream);
    default: return forward_impl<__half>(p, stream);
  }
}

cudaError_t mlp_backward(const MlpParams& p, cudaStream_t stream) {
  if (!problem_ok(p) || p.lse == nullptr || p.g_tgt == nullptr || p.a == nullptr) return cudaErrorInvalidValue;
  if (p.dh == nullptr && p.dw == nullptr) return cudaSuccess;
  const size_t need = mlp_backward_workspace_bytes(p);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case MlpDtype::kFloat32: return backward_impl<float>(p, stream);
    case MlpDtype::kBFloat16: return backward_impl<__nv_bfloat16>(p, stream);
    default: return backward_impl<__half>(p, stream);
  }
}

}  // namespace stp_mlp
