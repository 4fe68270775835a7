// Standalone C++ test of the CPU kernel (no Python, no torch): random inputs, a naive GEMM callback, and a
// float64 reference of the contract in stp_kernels/reference.py. Built and run by CMake (ctest).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "masked_logprob.h"

namespace {

void naive_gemm(void*, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      C[i * ldc + j] = float(alpha * acc + (beta == 0.f ? 0.0 : double(beta) * C[i * ldc + j]));
    }
}

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

float from_bf16(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

int failures = 0;

void expect_close(const char* what, const std::vector<double>& ref, const float* got, double rtol) {
  double max_err = 0, scale = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, std::fabs(ref[i]));
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) max_err = INFINITY;
    max_err = std::max(max_err, std::fabs(ref[i] - got[i]));
  }
  const bool ok = max_err <= rtol * scale;
  std::printf("  %-10s max abs err %.3e (scale %.3e) %s\n", what, max_err, scale, ok ? "ok" : "FAIL");
  failures += !ok;
}

void run_case(int64_t R, int64_t H, int64_t V, bool bf16, bool subset, float temp, uint32_t seed) {
  std::printf("case R=%lld H=%lld V=%lld %s%s T=%.2f\n", (long long)R, (long long)H, (long long)V,
              bf16 ? "bf16" : "fp32", subset ? " vocab-subset" : "", temp);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> h(R * H), w(V * H);
  for (auto& x : h) x = normal(gen);
  for (auto& x : w) x = normal(gen) * 2.f / std::sqrt(float(H));
  std::vector<uint16_t> h16(R * H), w16(V * H);
  if (bf16) {  // the reference sees exactly the rounded values the kernel sees
    for (int64_t i = 0; i < R * H; ++i) h[i] = from_bf16(h16[i] = to_bf16(h[i]));
    for (int64_t i = 0; i < V * H; ++i) w[i] = from_bf16(w16[i] = to_bf16(w[i]));
  }
  std::vector<int64_t> vocab;
  for (int64_t v = 0; v < V; ++v)
    if (!subset || gen() % 3 != 0) vocab.push_back(v);
  const int64_t Vs = int64_t(vocab.size());
  std::vector<int64_t> tgt(R);
  std::vector<float> g(R), a(R), b(R);
  for (int64_t r = 0; r < R; ++r) {
    tgt[r] = int64_t(gen() % uint32_t(Vs));
    g[r] = normal(gen);
    a[r] = normal(gen);
    b[r] = normal(gen);
  }
  // float64 reference of the contract
  const double it = 1.0 / temp;
  std::vector<double> z(R * Vs), lse(R), tl(R), mean(R), dh(R * H, 0.0), dw(Vs * H, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    double m = -INFINITY;
    for (int64_t v = 0; v < Vs; ++v) {
      double acc = 0;
      for (int64_t k = 0; k < H; ++k) acc += double(h[r * H + k]) * w[vocab[v] * H + k];
      z[r * Vs + v] = acc * it;
      m = std::max(m, z[r * Vs + v]);
    }
    double s = 0, sz = 0;
    for (int64_t v = 0; v < Vs; ++v) {
      s += std::exp(z[r * Vs + v] - m);
      sz += std::exp(z[r * Vs + v] - m) * z[r * Vs + v];
    }
    lse[r] = m + std::log(s);
    tl[r] = z[r * Vs + tgt[r]];
    mean[r] = sz / s;
    for (int64_t v = 0; v < Vs; ++v) {
      const double p = std::exp(z[r * Vs + v] - lse[r]);
      const double dz = it * ((v == tgt[r] ? g[r] : 0.0) + p * (a[r] - b[r] * z[r * Vs + v]));
      for (int64_t k = 0; k < H; ++k) {
        dh[r * H + k] += dz * w[vocab[v] * H + k];
        dw[v * H + k] += dz * h[r * H + k];
      }
    }
  }
  stp::cpu::MaskedLogprobParams p{};
  p.h = bf16 ? static_cast<const void*>(h16.data()) : h.data();
  p.w = bf16 ? static_cast<const void*>(w16.data()) : w.data();
  p.vocab_ids = subset ? vocab.data() : nullptr;
  p.tgt = tgt.data();
  p.R = R;
  p.H = H;
  p.V = V;
  p.Vs = Vs;
  p.inv_temp = float(it);
  p.dtype = bf16 ? stp::cpu::DType::BF16 : stp::cpu::DType::F32;
  p.num_threads = 2;
  stp::cpu::Gemm gemm{naive_gemm, nullptr};
  std::vector<float> o_lse(R), o_tl(R), o_mean(R), o_dh(R * H, 0.f), o_dw(Vs * H, -1.f);
  stp::cpu::masked_logprob_forward(p, gemm, o_lse.data(), o_tl.data(), o_mean.data());
  stp::cpu::masked_logprob_backward(p, gemm, o_lse.data(), g.data(), a.data(), b.data(), o_dh.data(), o_dw.data());
  expect_close("lse", lse, o_lse.data(), 1e-5);
  expect_close("tgt_logit", tl, o_tl.data(), 1e-5);
  expect_close("mean", mean, o_mean.data(), 1e-5);
  expect_close("dh", dh, o_dh.data(), 1e-4);
  expect_close("dw", dw, o_dw.data(), 1e-4);
}

}  // namespace

int main() {
  run_case(37, 23, 301, false, false, 1.0f, 1);
  run_case(29, 40, 1100, false, true, 0.7f, 2);   // crosses a vocabulary tile boundary
  run_case(41, 24, 777, true, true, 1.3f, 3);
  run_case(3, 2056, 1030, true, false, 1.0f, 4);  // H large enough to shrink the vocabulary tile
  std::printf(failures ? "FAILED: %d checks\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
