// Host helpers shared by the standalone CUDA test programs (no torch): error checks, a fixed-seed RNG, and rounding
// of inputs to the kernel dtype so the float64 reference sees exactly the values the GPU reads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                                    \
  do {                                                                                              \
    const cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

namespace stp_test {

struct Rng {  // splitmix64: fixed seed, identical on every machine
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double sym() { return 2.0 * uniform() - 1.0; }                            // [-1, 1)
  double normal() {                                                         // Box-Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// D: a kernel dtype enum with members kFloat32, kBFloat16, kFloat16.
template <typename D>
const char* dtype_name(D d) {
  return d == D::kFloat32 ? "fp32" : d == D::kBFloat16 ? "bf16" : "fp16";
}

// Rounds x to the dtype and appends its bits to `bytes` (the device buffer's contents); returns the rounded value.
template <typename D>
float round_to(D d, float x, std::vector<uint8_t>& bytes) {
  if (d == D::kFloat32) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&x);
    bytes.insert(bytes.end(), p, p + 4);
    return x;
  }
  if (d == D::kBFloat16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&b);
    bytes.insert(bytes.end(), p, p + 2);
    return __bfloat162float(b);
  }
  const __half hv = __float2half_rn(x);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(&hv);
  bytes.insert(bytes.end(), p, p + 2);
  return __half2float(hv);
}

}  // namespace stp_test
