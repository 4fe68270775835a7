// CUDA kernels of sample_step: plain C++ interface (no torch), shared by bindings.cpp and the standalone test.
//
// The contract is the one in stp_kernels/torch_chunked_sample_step.py: for scored row r and vocabulary slot v
// (token tok(v) = vocab_ids[v], or v when vocab_ids is null)
//     z[r, v]     = <h[r], w[tok(v)]>                                        (float32 accumulation, untempered)
//     bits[r, v]  = mix32(key[r] ^ mix32(tok(v)))     mix32 = lowbias32 on uint32 (reference.mix32), key[r] =
//                                                     the low 32 bits of keys[r] (reference.row_keys)
//     u[r, v]     = ((bits >> 9) + 0.5) * 2^-23,   g = -log(-log(u))          (float32, u strictly in (0, 1))
//     score[r, v] = z * inv_temp + g                  (greedy: score = z; inv_temp is then ignored)
//     slot[r]  = first argmax_v score[r, v] (ties go to the lowest slot)
//     z_sel[r] = z[r, slot[r]],   lse[r] = log sum_v exp(z[r, v])
//     mean[r]  = sum_v softmax(z[r])_v z[r, v]         (only when mean_out is set; untempered z, so that the
//                                                     caller's predictive entropy is lse - mean)
// Nothing of size [R, Vs] is written: a block walks its vocabulary tiles keeping a running (best score, slot,
// z_sel) and an online (max, sum exp[, sum exp * z]) per row; per-split partials are merged in split order by a
// second kernel. The mean costs one more multiply-add per logit and one more partial word, and is compiled out
// (a template flag) when mean_out is null.
// Deterministic: no atomics, a fixed reduction order, and a split plan that depends on the shapes only, so two
// identical calls give bit-identical outputs on any GPU. The argmax itself does not depend on the split plan.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace stp_ss {

enum class SsDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct SsParams {
  // Problem. All device pointers; h, w row-major and contiguous.
  const void* h = nullptr;             // [R, H], dtype
  const void* w = nullptr;             // [V, H], dtype
  const int64_t* vocab_ids = nullptr;  // [Vs] token ids in [0, V) (not checked here), or nullptr (then Vs == V)
  const int64_t* keys = nullptr;       // [R] per-row counter keys (uint32 values held in int64)
  int64_t R = 0;                       // scored rows (0 is allowed: nothing is launched)
  int64_t H = 0;                       // hidden size (>= 1)
  int64_t V = 0;                       // rows of w
  int64_t Vs = 0;                      // vocabulary slots: vocab_ids length, or V (>= 1)
  float inv_temp = 1.f;                // 1 / temperature; ignored when greedy
  bool greedy = false;                 // score = z (no noise)
  SsDtype dtype = SsDtype::kFloat32;   // of h and w

  // Outputs, [R] each.
  int64_t* slot_out = nullptr;
  float* z_sel_out = nullptr;
  float* lse_out = nullptr;
  float* mean_out = nullptr;  // nullptr: the mean logit is not computed

  // Device scratch of at least ss_forward_workspace_bytes(*this) bytes (16-byte aligned).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  // Plan override for tests: number of vocabulary splits (clamped to [1, vocabulary tiles]); 0 = automatic.
  int64_t splits = 0;
};

// Scratch the launcher needs for these shapes / override (only mean_out's nullness among the pointers is read):
// per split and row one int64 slot and four floats (best score, z_sel, max, sum exp), plus sum exp * z when
// mean_out is set.
size_t ss_forward_workspace_bytes(const SsParams& p);

// Enqueue on `stream`. Returns cudaErrorInvalidValue for inconsistent parameters, else the first launch error
// (cudaGetLastError after every launch). Asynchronous: execution errors surface at the next synchronisation.
cudaError_t ss_forward(const SsParams& p, cudaStream_t stream);

}  // namespace stp_ss
