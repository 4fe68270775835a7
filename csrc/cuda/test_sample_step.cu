// Standalone GPU test of the sample_step launcher against a float64 CPU reference of the same contract (including
// its own implementation of the counter-based noise). No torch. Build (one line) and run on an sm_90 GPU:
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a csrc/cuda/sample_step.cu
//        csrc/cuda/test_sample_step.cu -o /tmp/test_ss && /tmp/test_ss
// Checks per case: slot equals the reference argmax except where the reference's top-2 score gap is < 1e-4;
// z_sel (against the reference z at the returned slot), lse, the mean logit and the entropy lse - mean within
// tolerance; two runs bit-identical; the slot independent of the vocabulary split plan; a run without the mean
// bit-identical in slot, z_sel and lse. Exit status 0 when every case passes, 1 otherwise.
#include "sample_step.h"

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

using stp_ss::SsDtype;
using stp_ss::SsParams;

namespace {

using stp_test::dtype_name;
using stp_test::Rng;
using stp_test::round_to;

// Host lowbias32, written independently of the kernel's (uint32_t arithmetic wraps mod 2^32).
uint32_t host_mix32(uint32_t x) {
  x ^= x >> 16;
  x = static_cast<uint32_t>(static_cast<uint64_t>(x) * 0x7FEB352Dull);
  x ^= x >> 15;
  x = static_cast<uint32_t>(static_cast<uint64_t>(x) * 0x846CA68Bull);
  x ^= x >> 16;
  return x;
}

// reference.call_key / row_keys for (seed, step, row id).
uint32_t host_row_key(uint64_t seed, uint64_t step, uint64_t row_id) {
  const uint32_t step_mix = host_mix32(static_cast<uint32_t>(step));
  const uint32_t k = host_mix32(static_cast<uint32_t>(seed) ^ host_mix32(static_cast<uint32_t>(seed >> 32) ^ step_mix));
  return host_mix32(k ^ host_mix32(static_cast<uint32_t>(row_id) ^ host_mix32(static_cast<uint32_t>(row_id >> 32))));
}

struct Case {
  const char* name;
  SsDtype dtype;
  int64_t R, H, V;
  bool subset;
  float temperature;  // 0: greedy
  int64_t splits;     // plan override (0: automatic)
};

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CK(cudaMalloc(&d, v.size() * sizeof(T) + 16));
  CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Outputs {
  std::vector<int64_t> slot;
  std::vector<float> z_sel, lse, mean;  // mean: empty when not asked for
};

Outputs run_gpu(SsParams p, int64_t splits, bool want_mean) {
  p.splits = splits;
  int64_t* slot = nullptr;
  float* z_sel = nullptr;
  float* lse = nullptr;
  float* mean = nullptr;
  CK(cudaMalloc(&slot, p.R * sizeof(int64_t)));
  CK(cudaMalloc(&z_sel, p.R * sizeof(float)));
  CK(cudaMalloc(&lse, p.R * sizeof(float)));
  if (want_mean) CK(cudaMalloc(&mean, p.R * sizeof(float)));
  p.slot_out = slot;
  p.z_sel_out = z_sel;
  p.lse_out = lse;
  p.mean_out = mean;
  const size_t ws_bytes = stp_ss::ss_forward_workspace_bytes(p);
  void* ws = nullptr;
  if (ws_bytes > 0) CK(cudaMalloc(&ws, ws_bytes));
  p.workspace = ws;
  p.workspace_bytes = ws_bytes;
  CK(stp_ss::ss_forward(p, nullptr));
  CK(cudaDeviceSynchronize());
  Outputs o;
  o.slot.resize(p.R);
  o.z_sel.resize(p.R);
  o.lse.resize(p.R);
  CK(cudaMemcpy(o.slot.data(), slot, p.R * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.z_sel.data(), z_sel, p.R * sizeof(float), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.lse.data(), lse, p.R * sizeof(float), cudaMemcpyDeviceToHost));
  if (want_mean) {
    o.mean.resize(p.R);
    CK(cudaMemcpy(o.mean.data(), mean, p.R * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaFree(mean));
  }
  CK(cudaFree(slot));
  CK(cudaFree(z_sel));
  CK(cudaFree(lse));
  if (ws != nullptr) CK(cudaFree(ws));
  return o;
}

bool run_case(const Case& c, uint64_t seed) {
  Rng rng(seed);
  const SsDtype d = c.dtype;
  std::vector<uint8_t> hb, wb;
  std::vector<double> h(c.R * c.H), w(c.V * c.H);
  for (auto& x : h) x = round_to(d, static_cast<float>(rng.normal()), hb);
  const double wscale = 3.0 / std::sqrt(static_cast<double>(c.H));
  for (auto& x : w) x = round_to(d, static_cast<float>(wscale * rng.normal()), wb);
  std::vector<int64_t> ids;
  if (c.subset) {
    for (int64_t v = 0; v < c.V; ++v)
      if (rng.uniform() < 0.5) ids.push_back(v);
  } else {
    for (int64_t v = 0; v < c.V; ++v) ids.push_back(v);
  }
  const int64_t Vs = static_cast<int64_t>(ids.size());
  std::vector<int64_t> keys(c.R);
  std::vector<uint32_t> key32(c.R);
  for (int64_t r = 0; r < c.R; ++r) {
    const uint64_t row_id = rng.next() >> 20;  // beyond 32 bits on purpose
    key32[r] = host_row_key(seed, 7, row_id);
    keys[r] = static_cast<int64_t>(key32[r]);
  }
  const bool greedy = c.temperature == 0.f;
  const float inv_temp = greedy ? 0.f : 1.f / c.temperature;

  // Reference (float64, except the float32 noise, which the contract defines in float32).
  std::vector<int64_t> ref_slot(c.R);
  std::vector<double> gap(c.R), ref_lse(c.R), ref_mean(c.R), zrow(Vs);
  std::vector<std::vector<double>> zref(c.R);
  for (int64_t r = 0; r < c.R; ++r) {
    double best = -INFINITY, second = -INFINITY, zmax = -INFINITY;
    int64_t arg = -1;
    for (int64_t v = 0; v < Vs; ++v) {
      double z = 0.0;
      const double* hr = &h[r * c.H];
      const double* wr = &w[ids[v] * c.H];
      for (int64_t k = 0; k < c.H; ++k) z += hr[k] * wr[k];
      zrow[v] = z;
      zmax = std::max(zmax, z);
      double score = z;
      if (!greedy) {
        const uint32_t bits = host_mix32(key32[r] ^ host_mix32(static_cast<uint32_t>(ids[v])));
        const double u = (static_cast<double>(bits >> 9) + 0.5) / 8388608.0;
        score = z * static_cast<double>(inv_temp) + static_cast<double>(static_cast<float>(-std::log(-std::log(u))));
      }
      if (score > best) {  // strict: the first maximal slot
        second = best;
        best = score;
        arg = v;
      } else if (score > second) {
        second = score;
      }
    }
    double s = 0.0, sz = 0.0;
    for (int64_t v = 0; v < Vs; ++v) {
      const double e = std::exp(zrow[v] - zmax);
      s += e;
      sz += e * zrow[v];
    }
    ref_slot[r] = arg;
    gap[r] = best - second;
    ref_lse[r] = zmax + std::log(s);
    ref_mean[r] = sz / s;
    zref[r] = zrow;
  }

  // GPU.
  void* dh = to_device(hb);
  void* dw = to_device(wb);
  int64_t* dids = c.subset ? to_device(ids) : nullptr;
  int64_t* dkeys = to_device(keys);
  SsParams p;
  p.h = dh;
  p.w = dw;
  p.vocab_ids = dids;
  p.keys = dkeys;
  p.R = c.R;
  p.H = c.H;
  p.V = c.V;
  p.Vs = Vs;
  p.inv_temp = inv_temp;
  p.greedy = greedy;
  p.dtype = d;
  const Outputs o1 = run_gpu(p, c.splits, true);
  const Outputs o2 = run_gpu(p, c.splits, true);
  const Outputs o_one = run_gpu(p, 1, true);  // another plan: a single split
  const Outputs o_nomean = run_gpu(p, c.splits, false);

  bool ok = true;
  int64_t mismatched = 0, near_ties = 0;
  double max_zerr = 0.0, max_lerr = 0.0, max_merr = 0.0, max_herr = 0.0;
  // fp32 accumulation over H products: allow ~1e-6 relative to the sum of |terms| (bounded by sqrt(H) * 3 here).
  const double tol = 1e-4 + 2e-6 * std::sqrt(static_cast<double>(c.H)) * 3.0;
  for (int64_t r = 0; r < c.R; ++r) {
    const int64_t s = o1.slot[r];
    if (s < 0 || s >= Vs) {
      std::printf("  row %lld: slot %lld out of range [0, %lld)\n", (long long)r, (long long)s, (long long)Vs);
      ok = false;
      continue;
    }
    if (s != ref_slot[r]) {
      if (gap[r] < 1e-4) {
        ++near_ties;
      } else {
        if (mismatched < 5)
          std::printf("  row %lld: slot %lld, reference %lld (gap %.3g)\n", (long long)r, (long long)s,
                      (long long)ref_slot[r], gap[r]);
        ++mismatched;
      }
    }
    const double zerr = std::fabs(o1.z_sel[r] - zref[r][s]);
    const double lerr = std::fabs(o1.lse[r] - ref_lse[r]);
    max_zerr = std::max(max_zerr, zerr / (1.0 + std::fabs(zref[r][s])));
    max_lerr = std::max(max_lerr, lerr / (1.0 + std::fabs(ref_lse[r])));
    // The mean logit, and the entropy lse - mean (>= 0; a difference of two O(|z|) numbers, so its error is
    // relative to the logit scale, not to the entropy).
    const double merr = std::fabs(o1.mean[r] - ref_mean[r]);
    const double herr = std::fabs((double(o1.lse[r]) - double(o1.mean[r])) - (ref_lse[r] - ref_mean[r]));
    max_merr = std::max(max_merr, merr / (1.0 + std::fabs(ref_mean[r])));
    max_herr = std::max(max_herr, herr / (1.0 + std::fabs(ref_lse[r])));
    if (!(o1.lse[r] - o1.mean[r] >= -1e-5f)) ok = false;  // NaN or a clearly negative entropy
  }
  if (mismatched > 0) ok = false;
  if (max_zerr > tol || max_lerr > tol || max_merr > tol || max_herr > 2 * tol) ok = false;
  const bool deterministic = std::memcmp(o1.slot.data(), o2.slot.data(), c.R * sizeof(int64_t)) == 0 &&
                             std::memcmp(o1.z_sel.data(), o2.z_sel.data(), c.R * sizeof(float)) == 0 &&
                             std::memcmp(o1.lse.data(), o2.lse.data(), c.R * sizeof(float)) == 0 &&
                             std::memcmp(o1.mean.data(), o2.mean.data(), c.R * sizeof(float)) == 0;
  // Asking for the mean changes nothing else.
  const bool mean_free = std::memcmp(o1.slot.data(), o_nomean.slot.data(), c.R * sizeof(int64_t)) == 0 &&
                         std::memcmp(o1.z_sel.data(), o_nomean.z_sel.data(), c.R * sizeof(float)) == 0 &&
                         std::memcmp(o1.lse.data(), o_nomean.lse.data(), c.R * sizeof(float)) == 0;
  const bool plan_free = std::memcmp(o1.slot.data(), o_one.slot.data(), c.R * sizeof(int64_t)) == 0 &&
                         std::memcmp(o1.z_sel.data(), o_one.z_sel.data(), c.R * sizeof(float)) == 0;
  ok = ok && deterministic && plan_free && mean_free;
  std::printf("%-4s %-12s R=%-4lld H=%-4lld V=%-5lld Vs=%-5lld T=%.2f splits=%lld: %s  (slot mismatches %lld, "
              "near-ties %lld, z_sel err %.2e, lse err %.2e, mean err %.2e, entropy err %.2e, tol %.1e, "
              "deterministic %d, split-independent %d, mean-independent %d)\n",
              dtype_name(d), c.name, (long long)c.R, (long long)c.H, (long long)c.V, (long long)Vs, c.temperature,
              (long long)c.splits, ok ? "ok" : "FAIL", (long long)mismatched, (long long)near_ties, max_zerr, max_lerr,
              max_merr, max_herr, tol, deterministic, plan_free, mean_free);
  CK(cudaFree(dh));
  CK(cudaFree(dw));
  if (dids != nullptr) CK(cudaFree(dids));
  CK(cudaFree(dkeys));
  return ok;
}

bool invalid_params_rejected() {
  SsParams p;  // null pointers
  p.R = 4;
  p.H = 8;
  p.V = 16;
  p.Vs = 16;
  const bool ok = stp_ss::ss_forward(p, nullptr) == cudaErrorInvalidValue;
  std::printf("invalid parameters rejected: %s\n", ok ? "ok" : "FAIL");
  return ok;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "test_sample_step: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  const SsDtype dtypes[] = {SsDtype::kFloat32, SsDtype::kBFloat16, SsDtype::kFloat16};
  int failed = 0, total = 0;
  uint64_t seed = 4321;
  for (SsDtype d : dtypes) {
    const Case cases[] = {
        // name           dtype R    H    V     subset T      splits
        {"greedy", d, 37, 200, 1001, false, 0.0f, 0},
        {"T=0.7", d, 37, 200, 1001, false, 0.7f, 0},
        {"subset-T=1", d, 37, 200, 1001, true, 1.0f, 0},
        {"subset-greedy", d, 37, 200, 1001, true, 0.0f, 0},
        // H = 77: ragged k steps; R = 130: ragged row tiles; 3 forced splits of 9 tiles.
        {"ragged-3split", d, 130, 77, 517, true, 1.3f, 3},
        {"one-row", d, 1, 40, 2000, false, 0.5f, 0},
        {"tiny-vocab", d, 65, 33, 5, false, 0.9f, 0},
    };
    for (const Case& c : cases) {
      ++total;
      if (!run_case(c, seed++)) ++failed;
    }
  }
  ++total;
  if (!invalid_params_rejected()) ++failed;
  std::printf("%d of %d cases passed\n", total - failed, total);
  return failed == 0 ? 0 : 1;
}
