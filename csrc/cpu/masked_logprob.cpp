// masked_logprob CPU kernel. See masked_logprob.h.
//
// Per vocabulary tile [v0, v0 + BV) (outer loop, so each weight tile is converted/gathered once) and per row
// block [r0, r0 + BR) (inner loop):
//   z = inv_temp * h[r0:r0+BR] @ Wsel[v0:v0+BV]^T       -- BLAS, float32, into a [BR, BV] scratch block
//   forward : online log-sum-exp per row (running max m, sum s, sum of e*z for the mean logit), target pick-up
//   backward: dz = g_tgt*[v == tgt] + exp(z - lse) * (a - b*z), scaled by inv_temp, in place, then
//             dh[rows] += dz @ Wtile (BLAS) and dw[tile] += dz^T @ h[rows] (BLAS)
// Scratch: one [BR, BV] block (<= 8 MiB), one [BV, H] weight tile, and h in float32 for 16-bit inputs;
// never [R, V]. Forward costs 2*R*H*Vs flops, backward 6*R*H*Vs (recompute + two products).
#include "masked_logprob.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace stp {
namespace cpu {
namespace {

// Element-wise loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STP_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STP_TARGET_CLONES
#endif

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlockElems = int64_t(1) << 21;  // [BR, BV] float32 scratch: 8 MiB

// exp(x) for x <= 0-ish arguments, branch-free so the loops vectorise (glibc's expf does not, without
// -ffast-math). Cody-Waite range reduction x = n*ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r
// (Cephes expf coefficients); max relative error about 2 ulp over [-87, 88]. Arguments below -87 return
// about 1.6e-38 instead of 0: an absolute error under 2e-38 on probabilities, far below float32 rounding of
// any sum that includes the row maximum (>= 1).
#pragma omp declare simd notinbranch
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.3762626647949f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

struct RowStats {
  float m, s, sz;
};

// Fold one row's tile of logits into its running (max, sum, sum e*z).
STP_TARGET_CLONES
void fold_row(const float* z, int64_t n, bool want_mean, RowStats* st) {
  float mt = kNegInf;
#pragma omp simd reduction(max : mt)
  for (int64_t j = 0; j < n; ++j) mt = std::max(mt, z[j]);
  const float m_new = std::max(st->m, mt);
  float acc = 0.f, accz = 0.f;
  if (want_mean) {
#pragma omp simd reduction(+ : acc, accz)
    for (int64_t j = 0; j < n; ++j) {
      const float e = fast_exp(z[j] - m_new);
      acc += e;
      accz += e * z[j];
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += fast_exp(z[j] - m_new);
  }
  const float scale = st->m == kNegInf ? 0.f : fast_exp(st->m - m_new);
  st->s = st->s * scale + acc;
  st->sz = st->sz * scale + accz;
  st->m = m_new;
}

// In place: z[j] <- inv_temp * exp(z[j] - lse) * (a - b*z[j]).
STP_TARGET_CLONES
void grad_row(float* z, int64_t n, float lse, float a, float b, float inv_temp) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = inv_temp * fast_exp(z[j] - lse) * (a - b * z[j]);
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_float(uint16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x8000u) << 16;
  uint32_t exp = (v >> 10) & 0x1fu, man = v & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void to_float(const void* src, DType dt, int64_t offset, int64_t n, float* dst) {
  switch (dt) {
    case DType::F32:
      std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
      break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
      break;
    }
  }
}

struct Tiling {
  int64_t bv, br;
};

Tiling tiling(const MaskedLogprobParams& p) {
  // Weight tile [BV, H] float32 kept near 8 MiB; BV in [64, 1024]. Row block fills the scratch block.
  const int64_t bv = std::min<int64_t>(std::max<int64_t>(kBlockElems / std::max<int64_t>(p.H, 1), 64), 1024);
  const int64_t bv_eff = std::min(bv, p.Vs);
  const int64_t br = std::min<int64_t>(p.R, std::max<int64_t>(kBlockElems / bv_eff, 16));
  return {bv_eff, br};
}

// Shared setup: float32 view of h (converted once for 16-bit inputs) and a weight-tile loader.
class Operands {
 public:
  explicit Operands(const MaskedLogprobParams& p) : p_(p) {
    if (p.dtype == DType::F32) {
      h32_ = static_cast<const float*>(p.h);
    } else {
      h_buf_.resize(p.R * p.H);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
      for (int64_t r = 0; r < p.R; ++r) to_float(p.h, p.dtype, r * p.H, p.H, h_buf_.data() + r * p.H);
      h32_ = h_buf_.data();
    }
  }
  const float* h32() const { return h32_; }

  // Rows [v0, v0 + n) of the selected weight, in float32. Points into w when no copy is needed.
  const float* weight_tile(int64_t v0, int64_t n) {
    if (p_.dtype == DType::F32 && p_.vocab_ids == nullptr) return static_cast<const float*>(p_.w) + v0 * p_.H;
    w_buf_.resize(n * p_.H);
    const MaskedLogprobParams& p = p_;
    float* dst = w_buf_.data();
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = p.vocab_ids ? p.vocab_ids[v0 + i] : v0 + i;
      to_float(p.w, p.dtype, row * p.H, p.H, dst + i * p.H);
    }
    return w_buf_.data();
  }

 private:
  const MaskedLogprobParams& p_;
  const float* h32_ = nullptr;
  std::vector<float> h_buf_, w_buf_;
};

}  // namespace

int64_t masked_logprob_workspace_bytes(const MaskedLogprobParams& p) {
  const Tiling t = tiling(p);
  int64_t floats = t.br * t.bv;
  if (p.dtype != DType::F32) floats += p.R * p.H;
  if (p.dtype != DType::F32 || p.vocab_ids != nullptr) floats += t.bv * p.H;
  return floats * static_cast<int64_t>(sizeof(float)) + p.R * static_cast<int64_t>(sizeof(RowStats));
}

void masked_logprob_forward(const MaskedLogprobParams& p, const Gemm& gemm, float* lse, float* tgt_logit,
                            float* mean_logit) {
  const Tiling t = tiling(p);
  Operands ops(p);
  std::vector<float> zbuf(t.br * t.bv);
  std::vector<RowStats> stats(p.R, RowStats{kNegInf, 0.f, 0.f});
  const bool want_mean = mean_logit != nullptr;
  for (int64_t v0 = 0; v0 < p.Vs; v0 += t.bv) {
    const int64_t nv = std::min(t.bv, p.Vs - v0);
    const float* wt = ops.weight_tile(v0, nv);
    for (int64_t r0 = 0; r0 < p.R; r0 += t.br) {
      const int64_t nr = std::min(t.br, p.R - r0);
      float* z = zbuf.data();
      gemm.fn(gemm.ctx, false, true, nr, nv, p.H, p.inv_temp, ops.h32() + r0 * p.H, p.H, wt, p.H, 0.f, z, nv);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        fold_row(z + i * nv, nv, want_mean, &stats[r]);
        const int64_t local = p.tgt[r] - v0;
        if (local >= 0 && local < nv) tgt_logit[r] = z[i * nv + local];
      }
    }
  }
  for (int64_t r = 0; r < p.R; ++r) {
    lse[r] = stats[r].m + std::log(stats[r].s);
    if (want_mean) mean_logit[r] = stats[r].sz / stats[r].s;
  }
}

void masked_logprob_backward(const MaskedLogprobParams& p, const Gemm& gemm, const float* lse, const float* g_tgt,
                             const float* a, const float* b, float* dh, float* dw) {
  if (dh == nullptr && dw == nullptr) return;
  const Tiling t = tiling(p);
  Operands ops(p);
  std::vector<float> zbuf(t.br * t.bv);
  for (int64_t v0 = 0; v0 < p.Vs; v0 += t.bv) {
    const int64_t nv = std::min(t.bv, p.Vs - v0);
    const float* wt = ops.weight_tile(v0, nv);
    for (int64_t r0 = 0; r0 < p.R; r0 += t.br) {
      const int64_t nr = std::min(t.br, p.R - r0);
      float* dz = zbuf.data();
      gemm.fn(gemm.ctx, false, true, nr, nv, p.H, p.inv_temp, ops.h32() + r0 * p.H, p.H, wt, p.H, 0.f, dz, nv);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        grad_row(dz + i * nv, nv, lse[r], a[r], b ? b[r] : 0.f, p.inv_temp);
        const int64_t local = p.tgt[r] - v0;
        if (local >= 0 && local < nv) dz[i * nv + local] += p.inv_temp * g_tgt[r];
      }
      if (dh) gemm.fn(gemm.ctx, false, false, nr, p.H, nv, 1.f, dz, nv, wt, p.H, 1.f, dh + r0 * p.H, p.H);
      if (dw)
        gemm.fn(gemm.ctx, true, false, nv, p.H, nr, 1.f, dz, nv, ops.h32() + r0 * p.H, p.H, r0 == 0 ? 0.f : 1.f,
                dw + v0 * p.H, p.H);
    }
  }
}

}  // namespace cpu
}  // namespace stp
