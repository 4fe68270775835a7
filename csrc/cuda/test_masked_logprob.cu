// Standalone GPU test of the masked_logprob launchers against a float64 CPU reference of the same contract.
// No torch. Build (one line) and run on an sm_90 GPU:
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a csrc/cuda/masked_logprob.cu
//        csrc/cuda/test_masked_logprob.cu -o /tmp/test_mlp && /tmp/test_mlp
// Exit status 0 when every case is within tolerance and two runs give bit-identical outputs, 1 otherwise.
#include "masked_logprob.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using stp_mlp::MlpDtype;
using stp_mlp::MlpParams;

namespace {

using stp_test::dtype_name;
using stp_test::Rng;
using stp_test::round_to;

struct Case {
  const char* name;
  MlpDtype dtype;
  int64_t R, H, V;
  bool subset;      // vocabulary prior (vocab_ids) of about 40% of the ids
  bool use_b;       // entropy coefficient b given
  bool want_mean;
  bool need_dh, need_dw;
  int64_t fwd_splits, bwd_chunk;  // 0 = automatic plan
  float temperature;
};

struct Outputs {
  std::vector<float> lse, tgt_logit, mean, dh, dw;
};

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CK(cudaMalloc(&d, v.size() * sizeof(T) + 16));
  if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<float> to_host(const float* d, size_t n) {
  std::vector<float> v(n);
  if (n) CK(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

// n elements of dtype d on the device, as floats (exact: every bf16 / fp16 value is a float).
std::vector<float> to_host(const void* d, size_t n, MlpDtype dt) {
  if (dt == MlpDtype::kFloat32) return to_host(static_cast<const float*>(d), n);
  std::vector<uint16_t> bits(n);
  if (n) CK(cudaMemcpy(bits.data(), d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (dt == MlpDtype::kBFloat16) {
      __nv_bfloat16 x;
      std::memcpy(&x, &bits[i], sizeof(x));
      v[i] = __bfloat162float(x);
    } else {
      __half x;
      std::memcpy(&x, &bits[i], sizeof(x));
      v[i] = __half2float(x);
    }
  }
  return v;
}

// Per element: |got - ref| <= tol[i], with a report that explains a failure.
bool compare_bound(const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                   const std::vector<double>& tol) {
  double worst = 0, max_abs = 0;
  size_t worst_i = 0, bad = 0, nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) ++nonfinite;
    const double err = std::fabs(double(got[i]) - ref[i]);
    const double q = std::isfinite(got[i]) ? err / tol[i] : INFINITY;
    if (q > 1) ++bad;
    if (q > worst) worst = q, worst_i = i;
    if (err > max_abs) max_abs = err;
  }
  const bool ok = bad == 0 && nonfinite == 0;
  std::printf("    %-10s max_abs_err %.3e  worst err/bound %.3f at %zu (got %.6g ref %.6g bound %.3g)%s", what, max_abs,
              worst, worst_i, ref.empty() ? 0.0 : double(got[worst_i]), ref.empty() ? 0.0 : ref[worst_i],
              ref.empty() ? 0.0 : tol[worst_i], ok ? "\n" : "");
  if (!ok) std::printf("  FAIL: %zu of %zu beyond the bound, %zu non-finite\n", bad, ref.size(), nonfinite);
  return ok;
}

// max |got - ref| / (atol + rtol |ref|) <= 1, with a report that explains a failure.
bool compare(const char* what, const std::vector<float>& got, const std::vector<double>& ref, double atol,
             double rtol) {
  double worst = 0, max_abs = 0, max_ref = 0;
  size_t worst_i = 0, bad = 0, nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) ++nonfinite;
    const double err = std::fabs(double(got[i]) - ref[i]);
    const double q = std::isfinite(got[i]) ? err / (atol + rtol * std::fabs(ref[i])) : INFINITY;
    if (q > 1) ++bad;
    if (q > worst) worst = q, worst_i = i;
    if (err > max_abs) max_abs = err;
    if (std::fabs(ref[i]) > max_ref) max_ref = std::fabs(ref[i]);
  }
  const bool ok = bad == 0 && nonfinite == 0;
  std::printf("    %-10s max_abs_err %.3e  max|ref| %.3e  worst err/tol %.3f at %zu (got %.6g ref %.6g)%s",
              what, max_abs, max_ref, worst, worst_i, ref.empty() ? 0.0 : double(got[worst_i]),
              ref.empty() ? 0.0 : ref[worst_i], ok ? "\n" : "");
  if (!ok) std::printf("  FAIL: %zu of %zu out of tolerance, %zu non-finite\n", bad, ref.size(), nonfinite);
  return ok;
}

bool same_bits(const char* what, const std::vector<float>& x, const std::vector<float>& y) {
  if (x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0))
    return true;
  std::printf("    FAIL: %s differs between two identical runs (nondeterministic)\n", what);
  return false;
}

bool run_case(const Case& c, uint64_t seed) {
  const size_t es = c.dtype == MlpDtype::kFloat32 ? 4 : 2;
  Rng rng(seed);
  // Inputs: h ~ U(-1, 1) * sqrt(3) (unit variance), w scaled so logits have a spread of about 3, which gives
  // peaked rows; rounded to the dtype first.
  std::vector<uint8_t> h_bytes, w_bytes;
  std::vector<float> hf(c.R * c.H), wf(c.V * c.H);
  const float ws = 3.0f / std::sqrt(float(c.H));
  for (auto& x : hf) x = round_to(c.dtype, float(rng.sym() * 1.7320508), h_bytes);
  for (auto& x : wf) x = round_to(c.dtype, float(rng.sym() * 1.7320508 * ws), w_bytes);
  std::vector<int64_t> ids;
  if (c.subset) {
    for (int64_t v = 0; v < c.V; ++v)
      if (rng.uniform() < 0.4) ids.push_back(v);
    if (ids.empty()) ids.push_back(0);
  }
  const int64_t Vs = c.subset ? int64_t(ids.size()) : c.V;
  std::vector<int64_t> tgt(c.R);
  for (auto& t : tgt) t = int64_t(rng.uniform() * Vs) % Vs;
  std::vector<float> g(c.R), a(c.R), b(c.R);
  for (int64_t r = 0; r < c.R; ++r) g[r] = float(rng.sym()), a[r] = float(rng.sym()), b[r] = float(rng.sym());
  const float inv_temp = 1.0f / c.temperature;

  // float64 reference forward.
  std::vector<double> z(size_t(c.R) * Vs), ref_lse(c.R), ref_tl(c.R), ref_mean(c.R);
  for (int64_t r = 0; r < c.R; ++r) {
    double m = -INFINITY;
    for (int64_t v = 0; v < Vs; ++v) {
      const int64_t tok = c.subset ? ids[v] : v;
      double acc = 0;
      for (int64_t k = 0; k < c.H; ++k) acc += double(hf[r * c.H + k]) * double(wf[tok * c.H + k]);
      z[r * Vs + v] = acc * double(inv_temp);
      m = std::fmax(m, z[r * Vs + v]);
    }
    double s = 0, sz = 0;
    for (int64_t v = 0; v < Vs; ++v) {
      const double e = std::exp(z[r * Vs + v] - m);
      s += e;
      sz += e * z[r * Vs + v];
    }
    ref_lse[r] = m + std::log(s);
    ref_tl[r] = z[r * Vs + tgt[r]];
    ref_mean[r] = sz / s;
  }

  // Device buffers.
  void* d_h = to_device(h_bytes);
  void* d_w = to_device(w_bytes);
  int64_t* d_ids = c.subset ? to_device(ids) : nullptr;
  int64_t* d_tgt = to_device(tgt);
  float* d_g = to_device(g);
  float* d_a = to_device(a);
  float* d_b = to_device(b);
  float *d_lse, *d_tl, *d_mean, *d_dh = nullptr;
  void* d_dw = nullptr;  // in the input dtype
  CK(cudaMalloc(&d_lse, c.R * sizeof(float)));
  CK(cudaMalloc(&d_tl, c.R * sizeof(float)));
  CK(cudaMalloc(&d_mean, c.R * sizeof(float)));
  if (c.need_dh) CK(cudaMalloc(&d_dh, size_t(c.R) * c.H * sizeof(float)));
  if (c.need_dw) CK(cudaMalloc(&d_dw, size_t(Vs) * c.H * es));

  MlpParams p;
  p.h = d_h;
  p.w = d_w;
  p.vocab_ids = d_ids;
  p.tgt = d_tgt;
  p.R = c.R;
  p.H = c.H;
  p.V = c.V;
  p.Vs = Vs;
  p.inv_temp = inv_temp;
  p.dtype = c.dtype;
  p.lse_out = d_lse;
  p.tgt_logit_out = d_tl;
  p.mean_out = c.want_mean ? d_mean : nullptr;
  p.lse = d_lse;  // backward reads the forward's lse, as the autograd Function does
  p.g_tgt = d_g;
  p.a = d_a;
  p.b = c.use_b ? d_b : nullptr;
  p.dh = d_dh;
  p.dw = d_dw;
  p.fwd_splits = c.fwd_splits;
  p.bwd_vocab_chunk = c.bwd_chunk;
  const size_t ws_bytes = std::max(stp_mlp::mlp_forward_workspace_bytes(p), stp_mlp::mlp_backward_workspace_bytes(p));
  void* d_ws = nullptr;
  CK(cudaMalloc(&d_ws, ws_bytes + 16));
  p.workspace = d_ws;
  p.workspace_bytes = ws_bytes;
  std::printf("  %s [%s] R=%lld H=%lld V=%lld Vs=%lld subset=%d b=%d mean=%d dh=%d dw=%d splits=%lld chunk=%lld "
              "T=%.2f (h %zu B/elem, workspace %zu B)\n",
              c.name, dtype_name(c.dtype), (long long)c.R, (long long)c.H, (long long)c.V, (long long)Vs,
              c.subset, c.use_b, c.want_mean, c.need_dh, c.need_dw, (long long)c.fwd_splits,
              (long long)c.bwd_chunk, c.temperature, es, ws_bytes);

  Outputs out[2];
  for (int run = 0; run < 2; ++run) {
    // Poison outputs so a missed write shows up.
    CK(cudaMemset(d_lse, 0xff, c.R * sizeof(float)));
    CK(cudaMemset(d_tl, 0xff, c.R * sizeof(float)));
    CK(cudaMemset(d_mean, 0xff, c.R * sizeof(float)));
    if (d_dh) CK(cudaMemset(d_dh, 0xff, size_t(c.R) * c.H * sizeof(float)));
    if (d_dw) CK(cudaMemset(d_dw, 0xff, size_t(Vs) * c.H * es));
    CK(stp_mlp::mlp_forward(p, nullptr));
    CK(stp_mlp::mlp_backward(p, nullptr));
    CK(cudaDeviceSynchronize());
    out[run].lse = to_host(d_lse, c.R);
    out[run].tgt_logit = to_host(d_tl, c.R);
    if (c.want_mean) out[run].mean = to_host(d_mean, c.R);
    if (d_dh) out[run].dh = to_host(d_dh, size_t(c.R) * c.H);
    if (d_dw) out[run].dw = to_host(d_dw, size_t(Vs) * c.H, c.dtype);
  }

  // float64 reference backward, from the GPU's lse (the contract's input), so it isolates backward errors.
  // abs_dh / abs_dw: the sums of |term| of each gradient element, for the rounding bound below.
  std::vector<double> ref_dh(c.need_dh ? size_t(c.R) * c.H : 0, 0.0), ref_dw(c.need_dw ? size_t(Vs) * c.H : 0, 0.0);
  std::vector<double> abs_dh(ref_dh.size(), 0.0), abs_dw(ref_dw.size(), 0.0);
  for (int64_t r = 0; r < c.R; ++r) {
    for (int64_t v = 0; v < Vs; ++v) {
      const double zz = z[r * Vs + v];
      const double pr = std::exp(zz - double(out[0].lse[r]));
      double dz = pr * (double(a[r]) - (c.use_b ? double(b[r]) : 0.0) * zz);
      if (v == tgt[r]) dz += double(g[r]);
      dz *= double(inv_temp);
      const int64_t tok = c.subset ? ids[v] : v;
      if (c.need_dh)
        for (int64_t k = 0; k < c.H; ++k) {
          ref_dh[r * c.H + k] += dz * double(wf[tok * c.H + k]);
          abs_dh[r * c.H + k] += std::fabs(dz * double(wf[tok * c.H + k]));
        }
      if (c.need_dw)
        for (int64_t k = 0; k < c.H; ++k) {
          ref_dw[v * c.H + k] += dz * double(hf[r * c.H + k]);
          abs_dw[v * c.H + k] += std::fabs(dz * double(hf[r * c.H + k]));
        }
    }
  }

  // Forward: inputs are exact in every dtype and products accumulate in fp32, so the forward is fp32-accurate.
  // Backward, bf16 / fp16: dz is rounded once to the input dtype (relative error <= u = 2^-8 bf16, 2^-11 fp16, and
  // for fp16 an absolute 2^-25 below its normal range), so each term dz * x of a gradient element is off by at most
  // u |dz x| (+ 2^-25 |x|): the element by at most u * sum |terms| (abs_dh / abs_dw), a rigorous bound whatever the
  // cancellation. dw is also rounded once to the dtype at the store (u |dw|); dh is float32. The bound is doubled
  // and 1e-5 max|ref| added for the fp32 accumulation. Rounding dz twice, or not at all where it should be, shows.
  const bool lowp = c.dtype != MlpDtype::kFloat32;
  const double u = c.dtype == MlpDtype::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);  // unit roundoff
  const double floor_abs = c.dtype == MlpDtype::kFloat16 ? std::ldexp(1.0, -25) : 0.0;
  double max_w = 0, max_h = 0;
  for (float x : wf) max_w = std::fmax(max_w, std::fabs(x));
  for (float x : hf) max_h = std::fmax(max_h, std::fabs(x));
  auto max_abs = [](const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m = std::fmax(m, std::fabs(x));
    return m;
  };
  bool ok = true;
  ok &= compare("lse", out[0].lse, ref_lse, 2e-4, 2e-5);
  ok &= compare("tgt_logit", out[0].tgt_logit, ref_tl, 2e-4, 2e-5);
  if (c.want_mean) ok &= compare("mean", out[0].mean, ref_mean, 2e-4, 2e-5);
  if (!lowp) {
    if (c.need_dh) ok &= compare("dh", out[0].dh, ref_dh, 1e-5 * max_abs(ref_dh), 1e-4);
    if (c.need_dw) ok &= compare("dw", out[0].dw, ref_dw, 1e-5 * max_abs(ref_dw), 1e-4);
  } else {
    std::vector<double> tol_dh(ref_dh.size()), tol_dw(ref_dw.size());
    const double acc_dh = 1e-5 * max_abs(ref_dh) + 1e-30, acc_dw = 1e-5 * max_abs(ref_dw) + 1e-30;
    for (size_t i = 0; i < tol_dh.size(); ++i)
      tol_dh[i] = 2 * (u * abs_dh[i] + floor_abs * double(Vs) * max_w) + acc_dh;
    for (size_t i = 0; i < tol_dw.size(); ++i)
      tol_dw[i] = 2 * (u * abs_dw[i] + u * std::fabs(ref_dw[i]) + floor_abs * double(c.R) * max_h) + acc_dw;
    if (c.need_dh) ok &= compare_bound("dh", out[0].dh, ref_dh, tol_dh);
    if (c.need_dw) ok &= compare_bound("dw", out[0].dw, ref_dw, tol_dw);
  }
  ok &= same_bits("lse", out[0].lse, out[1].lse);
  ok &= same_bits("tgt_logit", out[0].tgt_logit, out[1].tgt_logit);
  ok &= same_bits("mean", out[0].mean, out[1].mean);
  ok &= same_bits("dh", out[0].dh, out[1].dh);
  ok &= same_bits("dw", out[0].dw, out[1].dw);
  std::printf("    %s\n", ok ? "ok (and bit-identical across two runs)" : "FAILED");

  for (void* ptr : {d_h, d_w, static_cast<void*>(d_ids), static_cast<void*>(d_tgt), static_cast<void*>(d_g),
                    static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_lse),
                    static_cast<void*>(d_tl), static_cast<void*>(d_mean), static_cast<void*>(d_dh),
                    static_cast<void*>(d_dw), d_ws})
    if (ptr) CK(cudaFree(ptr));
  return ok;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "test_masked_logprob: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  const MlpDtype dtypes[] = {MlpDtype::kFloat32, MlpDtype::kBFloat16, MlpDtype::kFloat16};
  int failed = 0, total = 0;
  uint64_t seed = 1234;
  for (MlpDtype d : dtypes) {
    const Case cases[] = {
        // name          dtype R    H    V     subset b      mean   dh     dw     splits chunk T
        {"full-vocab", d, 37, 200, 1001, false, true, true, true, true, 0, 0, 1.0f},
        {"subset", d, 37, 200, 1001, true, true, true, true, true, 0, 0, 0.7f},
        // H = 77: rows not 16-byte aligned -> scalar loads; forced 3 splits and 128-slot backward chunks.
        {"ragged-H", d, 300, 77, 517, true, false, false, true, true, 3, 128, 1.3f},
        {"dh-only", d, 130, 64, 300, false, true, true, true, false, 2, 256, 1.0f},
        {"dw-only", d, 5, 40, 2000, true, true, false, false, true, 0, 0, 0.5f},
    };
    for (const Case& c : cases) {
      ++total;
      if (!run_case(c, seed++)) ++failed;
    }
  }
  std::printf("%d of %d cases passed\n", total - failed, total);
  return failed == 0 ? 0 : 1;
}
