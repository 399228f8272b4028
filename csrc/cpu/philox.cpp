// Counter-based normal noise on the CPU: out[s, i] = philox_normal(keys[s], offset + i) (see csrc/philox.h).
#include <ATen/Parallel.h>

#include "cpu/ops.h"
#include "philox.h"

namespace tempflow {

// keys (S,) int64 -> out (S, n) fp32 with out[s, i] = philox_normal(keys[s], offset + i).
at::Tensor philox_normal_cpu(const at::Tensor& keys, int64_t n, int64_t offset) {
  TORCH_CHECK(keys.device().is_cpu(), "philox_normal (cpu): keys must be a CPU tensor, got ",
              keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kLong, "philox_normal: keys must be int64, got ",
              keys.scalar_type());
  TORCH_CHECK(n >= 0, "philox_normal: n must be >= 0, got ", n);
  TORCH_CHECK(offset >= 0, "philox_normal: offset must be >= 0, got ", offset);
  const at::Tensor k = keys.contiguous().reshape({-1});
  const int64_t rows = k.numel();
  at::Tensor out = at::empty({rows, n}, keys.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return out;
  const int64_t* kp = k.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kGrain = 1 << 14;
  at::parallel_for(0, rows * n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t row = begin / n;
    int64_t col = begin - row * n;
    for (int64_t g = begin; g < end; ++g) {
      op[g] = philox_normal(static_cast<uint64_t>(kp[row]), static_cast<uint64_t>(offset + col));
      if (++col == n) {
        col = 0;
        ++row;
      }
    }
  });
  return out;
}

}  // namespace tempflow
