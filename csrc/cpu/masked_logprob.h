// masked_logprob on the CPU: plain C++ (no torch headers), OpenMP for the fused element-wise work, and a
// caller-supplied GEMM for the tile matmuls (the Python extension passes torch's BLAS; the standalone build
// and its C++ test pass a naive one). Contract: stp_kernels/reference.py, backend_contract().
#pragma once

#include <cstdint>

namespace stp {
namespace cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, with op(A) [M, K] and op(B) [K, N].
// trans_a: A is stored [K, M]; trans_b: B is stored [N, K]. beta == 0 must not read C.
using GemmFn = void (*)(void* ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                        const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                        int64_t ldc);

struct Gemm {
  GemmFn fn;
  void* ctx;
};

struct MaskedLogprobParams {
  const void* h;             // [R, H] in dtype
  const void* w;             // [V, H] in dtype
  const int64_t* vocab_ids;  // [Vs] sorted token ids, or nullptr (then Vs == V, slot v is token v)
  const int64_t* tgt;        // [R] slot of each row's target in [0, Vs)
  int64_t R, H, V, Vs;
  float inv_temp;
  DType dtype;
  int num_threads;
};

// lse, tgt_logit: [R]; mean_logit: [R] or nullptr.
void masked_logprob_forward(const MaskedLogprobParams& p, const Gemm& gemm, float* lse, float* tgt_logit,
                            float* mean_logit);

// lse, g_tgt, a: [R]; b: [R] or nullptr; dh: [R, H] zero-initialised or nullptr; dw: [Vs, H] or nullptr.
void masked_logprob_backward(const MaskedLogprobParams& p, const Gemm& gemm, const float* lse, const float* g_tgt,
                             const float* a, const float* b, float* dh, float* dw);

// Scratch memory the two functions allocate for these sizes (bytes), for documentation and tests.
int64_t masked_logprob_workspace_bytes(const MaskedLogprobParams& p);

}  // namespace cpu
}  // namespace stp
