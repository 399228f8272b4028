// Registration of the C++ CPU kernels as torch.library ops in the `tempflow_cpu` namespace. These are backend
// ops: the public, device-independent ops (`tempflow::...`, with fake implementations and autograd) live in
// tempflow/ops.py and call these for CPU tensors.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/ops.h"

TORCH_LIBRARY(tempflow_cpu, m) {
  m.def("philox_normal(Tensor keys, int n, int offset=0) -> Tensor");
  TEMPFLOW_DEFINE_BRANCH_OPS(m);
}

TORCH_LIBRARY_IMPL(tempflow_cpu, CPU, m) {
  m.impl("philox_normal", &tempflow::philox_normal_cpu);
  m.impl("branch_sample", &tempflow::branch_sample_cpu);
  m.impl("branch_logp", &tempflow::branch_logp_cpu);
  m.impl("branch_logp_backward", &tempflow::branch_logp_backward_cpu);
}

// The module itself is empty: importing it registers the ops above with torch.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
