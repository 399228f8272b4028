// Launchers of the CUDA branch kernels (csrc/cuda/branch_kernels.cu). Plain pointers and dtype codes
// (0 = float32, 1 = bfloat16, 2 = float16; branch tensors are float32 or the state's dtype), no torch types, so
// the kernels compile and can be checked without a CUDA build of torch. Partials are (B, tiles, K) and (B, tiles).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tempflow {
namespace cuda {

int64_t num_tiles(int64_t D);

cudaError_t launch_sample(const void* x, const void* v, const float* cx, const float* cv, const float* sd,
                          const void* noise, const int64_t* keys, int64_t B, int64_t K, int64_t D, int state_type,
                          int vel_type, int branch_type, float* out, float* mean_out, float* partial,
                          cudaStream_t stream);

cudaError_t launch_logp(const void* v, const void* x, const void* actions, const float* cx, const float* cv,
                        const void* v_ref, int64_t B, int64_t K, int64_t D, int state_type, int vel_type,
                        int branch_type, float* partial, float* partial_kl, cudaStream_t stream);

cudaError_t launch_logp_backward(const float* alpha, const float* beta, const void* v, const void* x,
                                 const void* actions, const float* cx, const float* cv, const void* v_ref, int64_t B,
                                 int64_t K, int64_t D, int state_type, int vel_type, int branch_type, void* grad,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace tempflow
