// Torch binding of the CUDA masked_logprob and sample_step kernels (module stp_kernels._C_cuda). The only file of
// this extension that includes torch: it checks every argument, allocates outputs and scratch with torch's caching
// allocator and launches on the current stream of the tensors' device. Interfaces: reference.backend_contract
// (forward, backward) and the contract in stp_kernels/torch_chunked_sample_step.py (sample_step_forward).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "masked_logprob.h"
#include "sample_step.h"

namespace {

using stp_mlp::MlpDtype;
using stp_mlp::MlpParams;

MlpDtype to_mlp_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MlpDtype::kFloat32;
    case at::kBFloat16: return MlpDtype::kBFloat16;
    case at::kHalf: return MlpDtype::kFloat16;
    default: TORCH_CHECK(false, "stp_kernels._C_cuda: h has dtype ", t, "; allowed: float32, bfloat16, float16");
  }
  return MlpDtype::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& h) {
  TORCH_CHECK(t.is_cuda(), "stp_kernels._C_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == h.device(), "stp_kernels._C_cuda: ", name, " is on ", t.device(), " but h is on ",
              h.device());
  TORCH_CHECK(t.is_contiguous(), "stp_kernels._C_cuda: ", name, " must be contiguous");
}

void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& h, at::ScalarType dtype) {
  check_cuda(t, name, h);
  TORCH_CHECK(t.scalar_type() == dtype, "stp_kernels._C_cuda: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == h.size(0), "stp_kernels._C_cuda: ", name, " must have shape [",
              h.size(0), "] (one per row of h), got ", t.sizes());
}

// Shared by every op: h [R, H] and w [V, H] on one CUDA device, contiguous, same dtype, non-empty.
void check_head(const at::Tensor& h, const at::Tensor& w) {
  TORCH_CHECK(h.is_cuda(), "stp_kernels._C_cuda: h must be a CUDA tensor, got device ", h.device());
  TORCH_CHECK(h.dim() == 2, "stp_kernels._C_cuda: h must be [R, H], got shape ", h.sizes());
  TORCH_CHECK(h.is_contiguous(), "stp_kernels._C_cuda: h must be contiguous");
  check_cuda(w, "w", h);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == h.size(1), "stp_kernels._C_cuda: w must be [V, H] with H = ",
              h.size(1), ", got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == h.scalar_type(), "stp_kernels._C_cuda: w has dtype ", w.scalar_type(),
              " but h has ", h.scalar_type(), "; they must match");
  TORCH_CHECK(h.size(1) > 0, "stp_kernels._C_cuda: hidden size must be >= 1, got ", h.size(1));
  TORCH_CHECK(w.size(0) > 0, "stp_kernels._C_cuda: w has no rows");
}

// The vocabulary prior's ids (nullptr without one) and the slot count Vs. Sortedness, uniqueness and the range
// [0, V) are validated in Python (stp_kernels.masked_logprob / sample_step, one host sync there); the kernels read
// w rows through these ids without checking them.
const int64_t* vocab_slots(const std::optional<at::Tensor>& vocab_ids, const at::Tensor& h, const at::Tensor& w,
                           int64_t* vs) {
  *vs = w.size(0);
  if (!vocab_ids.has_value()) return nullptr;
  const at::Tensor& ids = *vocab_ids;
  check_cuda(ids, "vocab_ids", h);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "stp_kernels._C_cuda: vocab_ids must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.numel() > 0,
              "stp_kernels._C_cuda: vocab_ids must be a non-empty 1-D tensor, got shape ", ids.sizes());
  *vs = ids.numel();
  return ids.data_ptr<int64_t>();
}

// Checks h, w, vocab_ids, tgt and fills the problem part of the params.
MlpParams problem(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& vocab_ids,
                  const at::Tensor& tgt, double inv_temp) {
  check_head(h, w);
  TORCH_CHECK(h.size(1) <= (int64_t(1) << 21), "stp_kernels._C_cuda: hidden size must be <= 2^21, got ", h.size(1));
  TORCH_CHECK(h.size(0) <= INT32_MAX, "stp_kernels._C_cuda: at most 2^31 - 1 rows, got ", h.size(0));
  check_row_vector(tgt, "tgt", h, at::kLong);
  MlpParams p;
  p.dtype = to_mlp_dtype(h.scalar_type());
  p.h = h.data_ptr();
  p.w = w.data_ptr();
  p.tgt = tgt.data_ptr<int64_t>();
  p.R = h.size(0);
  p.H = h.size(1);
  p.V = w.size(0);
  p.vocab_ids = vocab_slots(vocab_ids, h, w, &p.Vs);
  TORCH_CHECK(p.Vs <= INT32_MAX, "stp_kernels._C_cuda: at most 2^31 - 1 vocabulary slots, got ", p.Vs);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, "stp_kernels._C_cuda: inv_temp must be finite and > 0, got ",
              inv_temp);
  p.inv_temp = static_cast<float>(inv_temp);
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "stp_kernels._C_cuda.", what, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> forward(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& vocab_ids, const at::Tensor& tgt,
    double inv_temp, bool want_mean) {
  MlpParams p = problem(h, w, vocab_ids, tgt, inv_temp);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({p.R}, f32);
  at::Tensor tgt_logit = at::empty({p.R}, f32);
  std::optional<at::Tensor> mean;
  if (want_mean) mean = at::empty({p.R}, f32);
  p.lse_out = lse.data_ptr<float>();
  p.tgt_logit_out = tgt_logit.data_ptr<float>();
  p.mean_out = want_mean ? mean->data_ptr<float>() : nullptr;
  const size_t ws_bytes = stp_mlp::mlp_forward_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, h.options().dtype(at::kByte));
  p.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  check_launch(stp_mlp::mlp_forward(p, at::cuda::getCurrentCUDAStream().stream()), "forward");
  return {lse, tgt_logit, mean};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& vocab_ids, const at::Tensor& tgt,
    double inv_temp, const at::Tensor& lse, const at::Tensor& g_tgt, const at::Tensor& a,
    const std::optional<at::Tensor>& b, bool need_dh, bool need_dw) {
  MlpParams p = problem(h, w, vocab_ids, tgt, inv_temp);
  check_row_vector(lse, "lse", h, at::kFloat);
  check_row_vector(g_tgt, "g_tgt", h, at::kFloat);
  check_row_vector(a, "a", h, at::kFloat);
  if (b.has_value()) check_row_vector(*b, "b", h, at::kFloat);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto f32 = h.options().dtype(at::kFloat);
  std::optional<at::Tensor> dh, dw;
  if (need_dh) dh = at::empty({p.R, p.H}, f32);
  if (need_dw) dw = at::empty({p.Vs, p.H}, w.options());  // the weight's dtype: written once, no float32 copy
  if (p.R == 0) {  // no rows: the gradients are exactly zero, nothing to launch
    if (dh) dh->zero_();
    if (dw) dw->zero_();
    return {dh, dw};
  }
  if (!need_dh && !need_dw) return {dh, dw};
  p.lse = lse.data_ptr<float>();
  p.g_tgt = g_tgt.data_ptr<float>();
  p.a = a.data_ptr<float>();
  p.b = b.has_value() ? b->data_ptr<float>() : nullptr;
  p.dh = need_dh ? dh->data_ptr<float>() : nullptr;
  p.dw = need_dw ? dw->data_ptr() : nullptr;
  // Scratch for one vocabulary chunk of dz: one [R, chunk] buffer in the input dtype.
  const size_t ws_bytes = stp_mlp::mlp_backward_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, h.options().dtype(at::kByte));
  p.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  check_launch(stp_mlp::mlp_backward(p, at::cuda::getCurrentCUDAStream().stream()), "backward");
  return {dh, dw};
}

// ------------------------------------------------------------------------------------------------ sample_step
// Contract: stp_kernels/torch_chunked_sample_step.py (forward(h, w, vocab_ids, keys, inv_temp, greedy, want_mean)).

stp_ss::SsDtype to_ss_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return stp_ss::SsDtype::kFloat32;
    case at::kBFloat16: return stp_ss::SsDtype::kBFloat16;
    case at::kHalf: return stp_ss::SsDtype::kFloat16;
    default: TORCH_CHECK(false, "stp_kernels._C_cuda: h has dtype ", t, "; allowed: float32, bfloat16, float16");
  }
  return stp_ss::SsDtype::kFloat32;  // unreachable
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> sample_step_forward(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& vocab_ids, const at::Tensor& keys,
    double inv_temp, bool greedy, bool want_mean) {
  check_head(h, w);
  check_row_vector(keys, "keys", h, at::kLong);
  stp_ss::SsParams p;
  p.dtype = to_ss_dtype(h.scalar_type());
  p.h = h.data_ptr();
  p.w = w.data_ptr();
  p.keys = keys.data_ptr<int64_t>();
  p.R = h.size(0);
  p.H = h.size(1);
  p.V = w.size(0);
  p.vocab_ids = vocab_slots(vocab_ids, h, w, &p.Vs);
  p.greedy = greedy;
  if (!greedy) {
    TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0,
                "stp_kernels._C_cuda: inv_temp must be finite and > 0 unless greedy, got ", inv_temp);
  }
  p.inv_temp = greedy ? 0.f : static_cast<float>(inv_temp);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor slot = at::empty({p.R}, h.options().dtype(at::kLong));
  at::Tensor z_sel = at::empty({p.R}, h.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.R}, h.options().dtype(at::kFloat));
  std::optional<at::Tensor> mean;
  if (want_mean) mean = at::empty({p.R}, h.options().dtype(at::kFloat));
  if (p.R == 0) return {slot, z_sel, lse, mean};
  p.slot_out = slot.data_ptr<int64_t>();
  p.z_sel_out = z_sel.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  p.mean_out = want_mean ? mean->data_ptr<float>() : nullptr;
  const size_t ws_bytes = stp_ss::ss_forward_workspace_bytes(p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, h.options().dtype(at::kByte));
  p.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws_bytes;
  check_launch(stp_ss::ss_forward(p, at::cuda::getCurrentCUDAStream().stream()), "sample_step_forward");
  return {slot, z_sel, lse, mean};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "CUDA kernels of stp_kernels.masked_logprob (contract: stp_kernels.reference.backend_contract) and "
      "stp_kernels.sample_step (contract: stp_kernels.torch_chunked_sample_step)";
  m.def("forward", &forward, "(h, w, vocab_ids, tgt, inv_temp, want_mean) -> (lse, tgt_logit, mean | None)",
        py::arg("h"), py::arg("w"), py::arg("vocab_ids"), py::arg("tgt"), py::arg("inv_temp"), py::arg("want_mean"));
  m.def("backward", &backward,
        "(h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, need_dh, need_dw) -> (dh float32 | None, dw in w's dtype | None)",
        py::arg("h"), py::arg("w"), py::arg("vocab_ids"), py::arg("tgt"), py::arg("inv_temp"), py::arg("lse"),
        py::arg("g_tgt"), py::arg("a"), py::arg("b"), py::arg("need_dh"), py::arg("need_dw"));
  m.def("sample_step_forward", &sample_step_forward,
        "(h, w, vocab_ids, keys, inv_temp, greedy, want_mean) -> (slot int64, z_sel float32, lse float32, "
        "mean float32 | None); contract: stp_kernels.torch_chunked_sample_step",
        py::arg("h"), py::arg("w"), py::arg("vocab_ids"), py::arg("keys"), py::arg("inv_temp"), py::arg("greedy"),
        py::arg("want_mean"));
}
