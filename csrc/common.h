// Host-side pieces shared by the C++ (csrc/cpu) and CUDA (csrc/cuda) backends: the op schemas, registered once per
// backend namespace, and the dtype rule for branch tensors.
#pragma once

#include <ATen/ATen.h>

namespace tempflow {

// Branch tensors (noise, actions) stay in their dtype when it is fp32 or the state's; anything else goes to fp32.
inline at::Tensor branch_input(const at::Tensor& t, const at::Tensor& x) {
  const auto s = t.scalar_type();
  return (s == at::kFloat || s == x.scalar_type() ? t : t.to(at::kFloat)).contiguous();
}

}  // namespace tempflow

// The schemas of the branch ops, the same in every backend namespace (tempflow_cpu, tempflow_cuda).
#define TEMPFLOW_DEFINE_BRANCH_OPS(m)                                                                               \
  m.def(                                                                                                            \
      "branch_sample(Tensor x, Tensor v, Tensor coef_x, Tensor coef_v, Tensor std, Tensor? noise, Tensor? keys, "   \
      "int K, bool return_mean) -> (Tensor, Tensor, Tensor)");                                                      \
  m.def(                                                                                                            \
      "branch_logp(Tensor v, Tensor x, Tensor actions, Tensor coef_x, Tensor coef_v, Tensor? v_ref) -> "            \
      "(Tensor, Tensor)");                                                                                          \
  m.def(                                                                                                            \
      "branch_logp_backward(Tensor alpha, Tensor beta, Tensor v, Tensor x, Tensor actions, Tensor coef_x, "         \
      "Tensor coef_v, Tensor? v_ref) -> Tensor")
