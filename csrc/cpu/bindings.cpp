// Python binding of the CPU ops (stp_kernels._C_cpu): the only file of this extension that includes torch.
// Strict checks, output allocation, and the GEMM callback backed by torch's BLAS.
#include <torch/extension.h>

#include "masked_logprob.h"

namespace {

using stp::cpu::DType;

// Row-major GEMM through at::addmm_ on views of the caller's buffers (no copies; torch calls MKL/OpenBLAS).
void torch_gemm(void*, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto a = trans_a ? at::from_blob(const_cast<float*>(A), {M, K}, {1, lda}, opts)
                   : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  auto b = trans_b ? at::from_blob(const_cast<float*>(B), {K, N}, {1, ldb}, opts)
                   : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  c.addmm_(a, b, beta, alpha);  // beta == 0: c is not read (torch's documented addmm semantics)
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      TORCH_CHECK(false, "stp_kernels._C_cpu: h has dtype ", t.scalar_type(), "; allowed: float32, bfloat16, float16");
  }
}

void check_vec(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "stp_kernels._C_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "stp_kernels._C_cpu: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "stp_kernels._C_cpu: ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "stp_kernels._C_cpu: ", name, " must be contiguous");
}

stp::cpu::MaskedLogprobParams make_params(const at::Tensor& h, const at::Tensor& w,
                                          const c10::optional<at::Tensor>& vocab_ids, const at::Tensor& tgt,
                                          double inv_temp) {
  TORCH_CHECK(h.device().is_cpu() && w.device().is_cpu(), "stp_kernels._C_cpu: h and w must be CPU tensors");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1),
              "stp_kernels._C_cpu: need h [R, H] and w [V, H], got ", h.sizes(), " and ", w.sizes());
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "stp_kernels._C_cpu: h and w dtypes differ");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous(), "stp_kernels._C_cpu: h and w must be contiguous");
  TORCH_CHECK(h.size(0) > 0 && w.size(0) > 0 && h.size(1) > 0, "stp_kernels._C_cpu: empty input");
  stp::cpu::MaskedLogprobParams p{};
  p.h = h.data_ptr();
  p.w = w.data_ptr();
  p.R = h.size(0);
  p.H = h.size(1);
  p.V = w.size(0);
  p.Vs = p.V;
  p.vocab_ids = nullptr;
  if (vocab_ids.has_value()) {
    const auto& v = *vocab_ids;
    TORCH_CHECK(v.dim() == 1 && v.numel() > 0, "stp_kernels._C_cpu: vocab_ids must be a non-empty 1-D tensor");
    check_vec(v, "vocab_ids", at::kLong, v.numel());
    p.vocab_ids = v.data_ptr<int64_t>();
    p.Vs = v.numel();
  }
  check_vec(tgt, "tgt", at::kLong, p.R);
  p.tgt = tgt.data_ptr<int64_t>();
  p.inv_temp = static_cast<float>(inv_temp);
  p.dtype = dtype_of(h);
  p.num_threads = at::get_num_threads();
  return p;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> forward(const at::Tensor& h, const at::Tensor& w,
                                                                      const c10::optional<at::Tensor>& vocab_ids,
                                                                      const at::Tensor& tgt, double inv_temp,
                                                                      bool want_mean) {
  const auto p = make_params(h, w, vocab_ids, tgt, inv_temp);
  const auto f32 = h.options().dtype(at::kFloat);
  auto lse = at::empty({p.R}, f32);
  auto tgt_logit = at::empty({p.R}, f32);
  c10::optional<at::Tensor> mean;
  if (want_mean) mean = at::empty({p.R}, f32);
  stp::cpu::Gemm gemm{torch_gemm, nullptr};
  stp::cpu::masked_logprob_forward(p, gemm, lse.data_ptr<float>(), tgt_logit.data_ptr<float>(),
                                   want_mean ? mean->data_ptr<float>() : nullptr);
  return {lse, tgt_logit, mean};
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>> backward(
    const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& vocab_ids, const at::Tensor& tgt,
    double inv_temp, const at::Tensor& lse, const at::Tensor& g_tgt, const at::Tensor& a,
    const c10::optional<at::Tensor>& b, bool need_dh, bool need_dw) {
  const auto p = make_params(h, w, vocab_ids, tgt, inv_temp);
  check_vec(lse, "lse", at::kFloat, p.R);
  check_vec(g_tgt, "g_tgt", at::kFloat, p.R);
  check_vec(a, "a", at::kFloat, p.R);
  if (b.has_value()) check_vec(*b, "b", at::kFloat, p.R);
  const auto f32 = h.options().dtype(at::kFloat);
  c10::optional<at::Tensor> dh, dw;
  if (need_dh) dh = at::zeros({p.R, p.H}, f32);
  if (need_dw) dw = at::empty({p.Vs, p.H}, f32);
  stp::cpu::Gemm gemm{torch_gemm, nullptr};
  stp::cpu::masked_logprob_backward(p, gemm, lse.data_ptr<float>(), g_tgt.data_ptr<float>(), a.data_ptr<float>(),
                                    b.has_value() ? b->data_ptr<float>() : nullptr,
                                    need_dh ? dh->data_ptr<float>() : nullptr,
                                    need_dw ? dw->data_ptr<float>() : nullptr);
  return {dh, dw};
}

int64_t workspace_bytes(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& vocab_ids,
                        const at::Tensor& tgt) {
  return stp::cpu::masked_logprob_workspace_bytes(make_params(h, w, vocab_ids, tgt, 1.0));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stp_kernels CPU ops (C++/OpenMP, BLAS through torch)";
  m.def("masked_logprob_forward", &forward, "masked_logprob forward: (lse, tgt_logit, mean_logit|None)");
  m.def("masked_logprob_backward", &backward, "masked_logprob backward: (dh|None, dw|None)");
  m.def("masked_logprob_workspace_bytes", &workspace_bytes, "scratch bytes the CPU kernel allocates");
}
