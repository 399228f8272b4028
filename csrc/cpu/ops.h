// Declarations of tempflow's C++ CPU ops (registered in register.cpp under the `tempflow_cpu` namespace).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace tempflow {

at::Tensor philox_normal_cpu(const at::Tensor& keys, int64_t n, int64_t offset);

// out[i] = philox_normal(key, start + i) for i < n, vectorised (csrc/cpu/philox.cpp).
void philox_normal_block(uint64_t key, uint64_t start, int64_t n, float* out);

// x, v (B, D); cx, cv, std (B,) fp32; noise (B, K, D) or keys (B, K) int64.
// -> samples (B, K, D) fp32, sums (B, K) fp32 = sum_d (sample - mean)^2, mean (B, D) fp32 (empty unless asked)
std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_sample_cpu(const at::Tensor& x, const at::Tensor& v,
                                                                 const at::Tensor& cx, const at::Tensor& cv,
                                                                 const at::Tensor& std,
                                                                 const std::optional<at::Tensor>& noise,
                                                                 const std::optional<at::Tensor>& keys, int64_t K,
                                                                 bool return_mean);

// -> sums (B, K) = sum_d (actions - mean)^2 and kl_sums (B,) = sum_d (v - v_ref)^2 (zeros without v_ref)
std::tuple<at::Tensor, at::Tensor> branch_logp_cpu(const at::Tensor& v, const at::Tensor& x, const at::Tensor& actions,
                                                   const at::Tensor& cx, const at::Tensor& cv,
                                                   const std::optional<at::Tensor>& v_ref);

// grad_v[b, d] = sum_k alpha[b, k] (actions[b, k, d] - mean[b, d]) + beta[b] (v[b, d] - v_ref[b, d]), in v's dtype
at::Tensor branch_logp_backward_cpu(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& v,
                                    const at::Tensor& x, const at::Tensor& actions, const at::Tensor& cx,
                                    const at::Tensor& cv, const std::optional<at::Tensor>& v_ref);

}  // namespace tempflow
