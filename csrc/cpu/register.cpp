// Registration of the C++ CPU kernels as torch.library ops in the `tempflow_cpu` namespace. These are backend
// ops: the public, device-independent ops (`tempflow::...`, with fake implementations and autograd) live in
// tempflow/ops.py and call these for CPU tensors.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(tempflow_cpu, m) {
  m.def("philox_normal(Tensor keys, int n, int offset=0) -> Tensor");
  m.def(
      "branch_sample(Tensor x, Tensor v, Tensor coef_x, Tensor coef_v, Tensor std, Tensor? noise, Tensor? keys, "
      "int K, bool return_mean) -> (Tensor, Tensor, Tensor)");
  m.def("branch_logp(Tensor v, Tensor x, Tensor actions, Tensor coef_x, Tensor coef_v, Tensor? v_ref) -> (Tensor, Tensor)");
  m.def(
      "branch_logp_backward(Tensor alpha, Tensor beta, Tensor v, Tensor x, Tensor actions, Tensor coef_x, "
      "Tensor coef_v, Tensor? v_ref) -> Tensor");
  m.def("cfg_ode_step(Tensor x, Tensor v_uncond, Tensor v_cond, Tensor guidance, Tensor dt) -> Tensor");
}

TORCH_LIBRARY_IMPL(tempflow_cpu, CPU, m) {
  m.impl("philox_normal", &tempflow::philox_normal_cpu);
  m.impl("branch_sample", &tempflow::branch_sample_cpu);
  m.impl("branch_logp", &tempflow::branch_logp_cpu);
  m.impl("branch_logp_backward", &tempflow::branch_logp_backward_cpu);
  m.impl("cfg_ode_step", &tempflow::cfg_ode_step_cpu);
}

// The module itself is empty: importing it registers the ops above with torch.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
