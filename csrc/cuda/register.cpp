// Registration of the CUDA kernels as torch.library ops in the `tempflow_cuda` namespace: argument checks at the
// API edge (as in csrc/cpu/branch.cpp), allocation, the launch on the current stream, and the fixed-order
// reduction of the per-tile partial sums. Built only against a CUDA build of torch (setup.py).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/branch_kernels.h"

namespace tempflow {
namespace {

int type_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return 0;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but x is on ", like.device());
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, const at::Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == at::kFloat, name,
              " must be float32 of shape (", rows, ",), got ", t.scalar_type(), " ", t.sizes());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  check_cuda(t, name, like);
  type_code(t, name);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_launch(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_sample_cuda(const at::Tensor& x_in, const at::Tensor& v_in,
                                                                  const at::Tensor& cx, const at::Tensor& cv,
                                                                  const at::Tensor& std,
                                                                  const std::optional<at::Tensor>& noise_in,
                                                                  const std::optional<at::Tensor>& keys_in, int64_t K,
                                                                  bool return_mean) {
  TORCH_CHECK(x_in.dim() == 2, "branch_sample: x must be (B, D), got ", x_in.sizes());
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(K >= 1, "branch_sample: K must be >= 1, got ", K);
  check_shape(x_in, "branch_sample: x", {B, D}, x_in);
  check_shape(v_in, "branch_sample: v", {B, D}, x_in);
  check_rows(cx, "branch_sample: coef_x", B, x_in);
  check_rows(cv, "branch_sample: coef_v", B, x_in);
  check_rows(std, "branch_sample: std", B, x_in);
  TORCH_CHECK(noise_in.has_value() != keys_in.has_value(), "branch_sample: pass exactly one of noise and keys");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  at::Tensor noise, keys;
  if (noise_in) {
    check_shape(*noise_in, "branch_sample: noise", {B, K, D}, x);
    noise = branch_input(*noise_in, x);
  } else {
    check_cuda(*keys_in, "branch_sample: keys", x);
    TORCH_CHECK(keys_in->scalar_type() == at::kLong && keys_in->sizes() == at::IntArrayRef({B, K}),
                "branch_sample: keys must be int64 of shape (", B, ", ", K, "), got ", keys_in->sizes());
    keys = keys_in->contiguous();
  }
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, K, D}, opts);
  at::Tensor mean = return_mean ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor partial = at::empty({B, cuda::num_tiles(D), K}, opts);
  check_launch(cuda::launch_sample(x.data_ptr(), v.data_ptr(), cx.data_ptr<float>(), cv.data_ptr<float>(),
                                   std.data_ptr<float>(), noise.defined() ? noise.data_ptr() : nullptr,
                                   keys.defined() ? keys.data_ptr<int64_t>() : nullptr, B, K, D, type_code(x, "x"),
                                   type_code(v, "v"), noise.defined() ? type_code(noise, "noise") : 0,
                                   out.data_ptr<float>(), return_mean ? mean.data_ptr<float>() : nullptr,
                                   partial.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "branch_sample");
  return {out, partial.sum(1), mean};
}

std::tuple<at::Tensor, at::Tensor> branch_logp_cuda(const at::Tensor& v_in, const at::Tensor& x_in,
                                                    const at::Tensor& actions_in, const at::Tensor& cx,
                                                    const at::Tensor& cv, const std::optional<at::Tensor>& v_ref_in) {
  TORCH_CHECK(actions_in.dim() == 3, "branch_logp: actions must be (B, K, D), got ", actions_in.sizes());
  const int64_t B = actions_in.size(0), K = actions_in.size(1), D = actions_in.size(2);
  check_shape(x_in, "branch_logp: x", {B, D}, x_in);
  check_shape(v_in, "branch_logp: v", {B, D}, x_in);
  check_shape(actions_in, "branch_logp: actions", {B, K, D}, x_in);
  check_rows(cx, "branch_logp: coef_x", B, x_in);
  check_rows(cv, "branch_logp: coef_v", B, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor v = v_in.contiguous(), x = x_in.contiguous(), actions = branch_input(actions_in, x);
  at::Tensor v_ref;
  if (v_ref_in) {
    check_shape(*v_ref_in, "branch_logp: v_ref", {B, D}, x);
    v_ref = v_ref_in->to(v.scalar_type()).contiguous();
  }
  const auto opts = x.options().dtype(at::kFloat);
  const int64_t tiles = cuda::num_tiles(D);
  at::Tensor partial = at::empty({B, tiles, K}, opts), partial_kl = at::empty({B, tiles}, opts);
  check_launch(cuda::launch_logp(v.data_ptr(), x.data_ptr(), actions.data_ptr(), cx.data_ptr<float>(),
                                 cv.data_ptr<float>(), v_ref.defined() ? v_ref.data_ptr() : nullptr, B, K, D,
                                 type_code(x, "x"), type_code(v, "v"), type_code(actions, "actions"),
                                 partial.data_ptr<float>(), partial_kl.data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "branch_logp");
  return {partial.sum(1), partial_kl.sum(1)};
}

at::Tensor branch_logp_backward_cuda(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& v_in,
                                     const at::Tensor& x_in, const at::Tensor& actions_in, const at::Tensor& cx,
                                     const at::Tensor& cv, const std::optional<at::Tensor>& v_ref_in) {
  TORCH_CHECK(actions_in.dim() == 3, "branch_logp_backward: actions must be (B, K, D), got ", actions_in.sizes());
  const int64_t B = actions_in.size(0), K = actions_in.size(1), D = actions_in.size(2);
  check_shape(x_in, "branch_logp_backward: x", {B, D}, x_in);
  check_shape(v_in, "branch_logp_backward: v", {B, D}, x_in);
  check_rows(cx, "branch_logp_backward: coef_x", B, x_in);
  check_rows(cv, "branch_logp_backward: coef_v", B, x_in);
  check_rows(beta, "branch_logp_backward: beta", B, x_in);
  check_cuda(alpha, "branch_logp_backward: alpha", x_in);
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.sizes() == at::IntArrayRef({B, K}),
              "branch_logp_backward: alpha must be float32 (", B, ", ", K, "), got ", alpha.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor v = v_in.contiguous(), x = x_in.contiguous(), actions = branch_input(actions_in, x);
  const at::Tensor al = alpha.contiguous();
  at::Tensor v_ref;
  if (v_ref_in) {
    check_shape(*v_ref_in, "branch_logp_backward: v_ref", {B, D}, x);
    v_ref = v_ref_in->to(v.scalar_type()).contiguous();
  }
  at::Tensor grad = at::empty({B, D}, v.options());
  check_launch(cuda::launch_logp_backward(al.data_ptr<float>(), beta.data_ptr<float>(), v.data_ptr(), x.data_ptr(),
                                          actions.data_ptr(), cx.data_ptr<float>(), cv.data_ptr<float>(),
                                          v_ref.defined() ? v_ref.data_ptr() : nullptr, B, K, D, type_code(x, "x"),
                                          type_code(v, "v"), type_code(actions, "actions"), grad.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "branch_logp_backward");
  return grad;
}

}  // namespace
}  // namespace tempflow

TORCH_LIBRARY(tempflow_cuda, m) { TEMPFLOW_DEFINE_BRANCH_OPS(m); }

TORCH_LIBRARY_IMPL(tempflow_cuda, CUDA, m) {
  m.impl("branch_sample", &tempflow::branch_sample_cuda);
  m.impl("branch_logp", &tempflow::branch_logp_cuda);
  m.impl("branch_logp_backward", &tempflow::branch_logp_backward_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
