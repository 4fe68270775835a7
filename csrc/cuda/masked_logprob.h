// CUDA kernels of masked_logprob: plain C++ interface (no torch), shared by bindings.cpp and the standalone test.
//
// The contract is reference.backend_contract: for scored row r and vocabulary slot v (token sel(v) = vocab_ids[v],
// or v when vocab_ids is null)
//     z[r, v]   = inv_temp * <h[r], w[sel(v)]>                         (float32 accumulation)
//     forward:  lse[r] = log sum_v exp(z[r, v]),  tgt_logit[r] = z[r, tgt[r]],  mean[r] = sum_v p[r, v] z[r, v]
//     backward: dz[r, v] = g_tgt[r] [v == tgt[r]] + p[r, v] (a[r] - b[r] z[r, v]),   p = exp(z - lse)
//               dh = inv_temp * dz @ w[sel]  (float32),   dw = inv_temp * dz^T @ h  (in the input dtype)
// Nothing of size [R, Vs] is ever written: the forward keeps an online log-sum-exp per row, the backward
// recomputes z in vocabulary chunks of at most ~2^25 elements (see mlp_backward_workspace_bytes), rounds dz of a
// chunk once to the input dtype (as torch's own bf16 backward does) and runs the two products on it with float32
// accumulation (tensor cores for bf16 / fp16). dw is summed over all rows in one block and rounded once at the
// store, so no float32 [Vs, H] buffer exists.
// Every result is deterministic: no atomics, partials are combined in a fixed order, and the split / chunk plan
// depends on the shapes only (not on the GPU model), so results are bitwise reproducible run to run.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace stp_mlp {

enum class MlpDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct MlpParams {
  // Problem, read by forward and backward. All device pointers; h, w row-major and contiguous.
  const void* h = nullptr;              // [R, H], dtype
  const void* w = nullptr;              // [V, H], dtype
  const int64_t* vocab_ids = nullptr;   // [Vs] sorted unique token ids in [0, V), or nullptr (then Vs == V)
  const int64_t* tgt = nullptr;         // [R] target slots in [0, Vs)
  int64_t R = 0;                        // scored rows (0 is allowed: nothing is launched)
  int64_t H = 0;                        // hidden size
  int64_t V = 0;                        // rows of w
  int64_t Vs = 0;                       // vocabulary slots: vocab_ids length, or V
  float inv_temp = 1.f;
  MlpDtype dtype = MlpDtype::kFloat32;  // of h and w

  // Forward outputs, float32 [R]. mean_out == nullptr: the mean logit is not computed.
  // tgt_logit_out[r] is NaN when tgt[r] lies outside [0, Vs) (callers validate targets beforehand).
  float* lse_out = nullptr;
  float* tgt_logit_out = nullptr;
  float* mean_out = nullptr;

  // Backward inputs, float32 [R]; b == nullptr means b = 0.
  const float* lse = nullptr;
  const float* g_tgt = nullptr;
  const float* a = nullptr;
  const float* b = nullptr;
  // Backward outputs; nullptr = not requested (its GEMM is skipped).
  float* dh = nullptr;  // [R, H] float32
  void* dw = nullptr;   // [Vs, H] in `dtype` (the weight's), slot order

  // Device scratch of at least mlp_{forward,backward}_workspace_bytes(*this) bytes (16-byte aligned).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  // Plan overrides for tests; 0 = the automatic, shape-only plan. fwd_splits: number of vocabulary splits of
  // the forward (clamped to [1, vocabulary tiles]); bwd_vocab_chunk: slots per backward chunk (rounded up to 128).
  int64_t fwd_splits = 0;
  int64_t bwd_vocab_chunk = 0;
};

// Scratch the launchers need for these shapes / dtype / overrides (pointers are not read). Backward: R x chunk
// elements of dz in the input dtype.
size_t mlp_forward_workspace_bytes(const MlpParams& p);
size_t mlp_backward_workspace_bytes(const MlpParams& p);

// Enqueue on `stream`. Return cudaErrorInvalidValue for inconsistent parameters, else the first launch error
// (cudaGetLastError after every launch). Asynchronous: execution errors surface at the next synchronisation.
extern cudaError_t mlp_forward(const MlpParams& p, cudaStream_t stream);
extern cudaError_t mlp_backward(const MlpParams& p, cudaStream_t stream);

}  // namespace stp_mlp
