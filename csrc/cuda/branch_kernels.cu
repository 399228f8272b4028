// Hand-written CUDA kernels of the fused branch ops: the same contract as csrc/cpu/branch.cpp and kernels/branch.py.
//
// One thread block handles kTile = kThreads * kVec consecutive elements of one batch row (grid: tiles x rows). It
// reads the row's x and v once, keeps the SDE mean in registers, and loops over the K branches; each branch's
// sum of squares is reduced in the block (warp shuffles, then shared memory) and written as one partial per
// (row, tile, branch). The host adds the partials in a fixed order, so results are deterministic.
//
// This file includes no torch header: launchers take raw pointers, dtype codes and a stream, so it compiles on
// its own (`nvcc -c`), which is how machines without a CUDA build of torch check it. Build with --fmad=false so that
// `mean + std * eps` rounds like the torch reference (no contraction into FMA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.h"
#include "cuda/branch_kernels.h"

namespace tempflow {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kTile = kThreads * kVec;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Sum of `v` over the block; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename TS, typename TV, typename TA>
__global__ void __launch_bounds__(kThreads) sample_kernel(const TS* __restrict__ x, const TV* __restrict__ v,
                                                          const float* __restrict__ cx, const float* __restrict__ cv,
                                                          const float* __restrict__ sd, const TA* __restrict__ noise,
                                                          const int64_t* __restrict__ keys, int64_t D, int K,
                                                          float* __restrict__ out, float* __restrict__ mean_out,
                                                          float* __restrict__ partial) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.y, tile = blockIdx.x, ntiles = gridDim.x;
  const int64_t base = tile * kTile + threadIdx.x;
  const float a = cx[b], c = cv[b], s = sd[b];
  float m[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = base + j * kThreads;
    m[j] = i < D ? to_f(x[b * D + i]) * a + to_f(v[b * D + i]) * c : 0.f;
    if (mean_out != nullptr && i < D) mean_out[b * D + i] = m[j];
  }
  for (int k = 0; k < K; ++k) {
    const int64_t row = b * K + k;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < D) {
        const float e = noise != nullptr ? to_f(noise[row * D + i])
                                         : philox_normal(static_cast<uint64_t>(keys[row]), static_cast<uint64_t>(i));
        const float val = m[j] + s * e;
        out[row * D + i] = val;
        const float d = val - m[j];
        acc += d * d;
      }
    }
    const float total = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[(b * ntiles + tile) * K + k] = total;
  }
}

template <typename TS, typename TV, typename TA>
__global__ void __launch_bounds__(kThreads) logp_kernel(const TV* __restrict__ v, const TS* __restrict__ x,
                                                        const TA* __restrict__ actions, const float* __restrict__ cx,
                                                        const float* __restrict__ cv, const TV* __restrict__ v_ref,
                                                        int64_t D, int K, float* __restrict__ partial,
                                                        float* __restrict__ partial_kl) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.y, tile = blockIdx.x, ntiles = gridDim.x;
  const int64_t base = tile * kTile + threadIdx.x;
  const float a = cx[b], c = cv[b];
  float m[kVec], vv[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = base + j * kThreads;
    vv[j] = i < D ? to_f(v[b * D + i]) : 0.f;
    m[j] = i < D ? to_f(x[b * D + i]) * a + vv[j] * c : 0.f;
  }
  for (int k = 0; k < K; ++k) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < D) {
        const float d = to_f(actions[(b * K + k) * D + i]) - m[j];
        acc += d * d;
      }
    }
    const float total = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[(b * ntiles + tile) * K + k] = total;
  }
  float kl = 0.f;
  if (v_ref != nullptr) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < D) {
        const float d = vv[j] - to_f(v_ref[b * D + i]);
        kl += d * d;
      }
    }
  }
  const float total = block_sum(kl, shared);
  if (threadIdx.x == 0) partial_kl[b * ntiles + tile] = total;
}

template <typename TS, typename TV, typename TA>
__global__ void __launch_bounds__(kThreads) logp_backward_kernel(
    const float* __restrict__ alpha, const float* __restrict__ beta, const TV* __restrict__ v,
    const TS* __restrict__ x, const TA* __restrict__ actions, const float* __restrict__ cx,
    const float* __restrict__ cv, const TV* __restrict__ v_ref, int64_t D, int K, TV* __restrict__ grad) {
  const int64_t b = blockIdx.y;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const float a = cx[b], c = cv[b];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = base + j * kThreads;
    if (i >= D) continue;
    const float vi = to_f(v[b * D + i]);
    const float m = to_f(x[b * D + i]) * a + vi * c;
    float g = v_ref != nullptr ? beta[b] * (vi - to_f(v_ref[b * D + i])) : 0.f;
    for (int k = 0; k < K; ++k) g += alpha[b * K + k] * (to_f(actions[(b * K + k) * D + i]) - m);
    grad[b * D + i] = from_f<TV>(g);
  }
}

// ---- dtype dispatch: codes 0 = float32, 1 = bfloat16, 2 = float16 ----------------------------------------------

template <typename F>
void with_type(int code, F&& f) {
  switch (code) {
    case 0: f(float{}); break;
    case 1: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
}

template <typename F>
void with_types(int state, int vel, int branch, F&& f) {
  with_type(state, [&](auto s) {
    with_type(vel, [&](auto v) {
      using TS = decltype(s);
      if (branch == 0) {
        f(s, v, float{});
      } else {
        f(s, v, TS{});
      }
    });
  });
}

dim3 grid_for(int64_t B, int64_t D) { return dim3(static_cast<unsigned>(num_tiles(D)), static_cast<unsigned>(B)); }

}  // namespace

int64_t num_tiles(int64_t D) { return (D + kTile - 1) / kTile; }

cudaError_t launch_sample(const void* x, const void* v, const float* cx, const float* cv, const float* sd,
                          const void* noise, const int64_t* keys, int64_t B, int64_t K, int64_t D, int state_type,
                          int vel_type, int branch_type, float* out, float* mean_out, float* partial,
                          cudaStream_t stream) {
  with_types(state_type, vel_type, branch_type, [&](auto s, auto ve, auto br) {
    using TS = decltype(s);
    using TV = decltype(ve);
    using TA = decltype(br);
    sample_kernel<TS, TV, TA><<<grid_for(B, D), kThreads, 0, stream>>>(
        static_cast<const TS*>(x), static_cast<const TV*>(v), cx, cv, sd, static_cast<const TA*>(noise), keys, D,
        static_cast<int>(K), out, mean_out, partial);
  });
  return cudaGetLastError();
}

cudaError_t launch_logp(const void* v, const void* x, const void* actions, const float* cx, const float* cv,
                        const void* v_ref, int64_t B, int64_t K, int64_t D, int state_type, int vel_type,
                        int branch_type, float* partial, float* partial_kl, cudaStream_t stream) {
  with_types(state_type, vel_type, branch_type, [&](auto s, auto ve, auto br) {
    using TS = decltype(s);
    using TV = decltype(ve);
    using TA = decltype(br);
    logp_kernel<TS, TV, TA><<<grid_for(B, D), kThreads, 0, stream>>>(
        static_cast<const TV*>(v), static_cast<const TS*>(x), static_cast<const TA*>(actions), cx, cv,
        static_cast<const TV*>(v_ref), D, static_cast<int>(K), partial, partial_kl);
  });
  return cudaGetLastError();
}

cudaError_t launch_logp_backward(const float* alpha, const float* beta, const void* v, const void* x,
                                 const void* actions, const float* cx, const float* cv, const void* v_ref, int64_t B,
                                 int64_t K, int64_t D, int state_type, int vel_type, int branch_type, void* grad,
                                 cudaStream_t stream) {
  with_types(state_type, vel_type, branch_type, [&](auto s, auto ve, auto br) {
    using TS = decltype(s);
    using TV = decltype(ve);
    using TA = decltype(br);
    logp_backward_kernel<TS, TV, TA><<<grid_for(B, D), kThreads, 0, stream>>>(
        alpha, beta, static_cast<const TV*>(v), static_cast<const TS*>(x), static_cast<const TA*>(actions), cx, cv,
        static_cast<const TV*>(v_ref), D, static_cast<int>(K), static_cast<TV*>(grad));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tempflow
