// Counter-based normal noise on the CPU, vectorised: out[i] = philox_normal(key, start + i) (csrc/philox.h).
//
// The block loop is written for the compiler's auto-vectoriser: Philox's 32x32->64 multiplies map to packed
// unsigned multiplies, and log and cos are branch-free polynomials (Cephes' logf and cosf, about 1 ulp) instead
// of libm calls, which do not vectorise. The block function is compiled for x86-64-v4 (AVX-512 with DQ, whose
// 64-bit multiplies Philox needs), x86-64-v3 (AVX2) and a baseline, and the
// loader picks the best one the machine has (GCC target_clones), so one build runs everywhere. Integers and
// uniforms equal the reference exactly; normals agree with it (and with Triton's tl.randn) to a few ulp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/ops.h"
#include "philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TEMPFLOW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TEMPFLOW_CLONES
#endif

namespace tempflow {
namespace {

inline uint32_t as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Select a where mask is all ones, b where it is zero (exact: a bit select, not arithmetic).
inline float select(uint32_t mask, float a, float b) { return as_float((as_uint(a) & mask) | (as_uint(b) & ~mask)); }

// Natural log of a normal float x > 0 (Cephes logf), written without branches so that it vectorises.
inline float log_poly(float x) {
  const uint32_t bits = as_uint(x);
  const float m = as_float((bits & 0x7fffffu) | 0x3f000000u);  // x = m 2^e, m in [0.5, 1)
  const int32_t small = m < 0.707106781186547524f;              // then use 2m in [1, sqrt 2) and e - 1
  const int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126 - small;
  const float f = m * static_cast<float>(1 + small) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// cos(x) for 0 <= x < 2 pi (Cephes cosf), branch-free octant selection.
inline float cos_poly(float x) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // octant, x * 4 / pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  const int32_t upper = j >> 2;  // octants 4..7: cos(x) = -cos(x - pi)
  j &= 3;
  const int32_t negative = upper ^ (j >> 1);
  const int32_t use_sin = ((j + 1) >> 1) & 1;  // j = 1 or 2
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float v = select(0u - static_cast<uint32_t>(use_sin), s, c);
  return as_float(as_uint(v) ^ (static_cast<uint32_t>(negative) << 31));
}

// Triton's uint_to_uniform_float: the int32 bit pattern, folded to non-negative by ~x, times the scale.
inline float uniform(uint32_t bits) {
  const int32_t x = static_cast<int32_t>(bits);
  return static_cast<float>(x ^ (x >> 31)) * 4.6566127342e-10f;
}

}  // namespace

TEMPFLOW_CLONES
void philox_normal_block(uint64_t key, uint64_t start, int64_t n, float* out) {
  constexpr int64_t kSub = 256;
  const uint32_t key0 = static_cast<uint32_t>(key), key1 = static_cast<uint32_t>(key >> 32);
  uint32_t w0[kSub], w1[kSub];
  for (int64_t s0 = 0; s0 < n; s0 += kSub) {
    const int64_t m = std::min(kSub, n - s0);
    // 1) Philox4x32-10 of counters (start + i, 0, 0): the first two output words
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const uint64_t idx = start + static_cast<uint64_t>(s0 + i);
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(idx), static_cast<uint32_t>(idx >> 32), 0u, 0u, key0, key1);
      w0[i] = r.c0;
      w1[i] = r.c1;
    }
    // 2) Box-Muller on the two uniforms (first output)
    float* o = out + s0;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const float u = uniform(w0[i]);
      const float u1 = select(0u - static_cast<uint32_t>(u < 1.0e-7f), 1.0e-7f, u);  // max(u, 1e-7), branch-free
      const float rad = std::sqrt(-2.0f * log_poly(u1));
      o[i] = rad * cos_poly(6.283185307179586f * uniform(w1[i]));
    }
  }
}

// keys (S,) int64 -> out (S, n) fp32 with out[s, i] = philox_normal(keys[s], offset + i).
at::Tensor philox_normal_cpu(const at::Tensor& keys, int64_t n, int64_t offset) {
  TORCH_CHECK(keys.device().is_cpu(), "philox_normal (cpu): keys must be a CPU tensor, got ", keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kLong, "philox_normal: keys must be int64, got ", keys.scalar_type());
  TORCH_CHECK(n >= 0, "philox_normal: n must be >= 0, got ", n);
  TORCH_CHECK(offset >= 0, "philox_normal: offset must be >= 0, got ", offset);
  const at::Tensor k = keys.contiguous().reshape({-1});
  const int64_t rows = k.numel();
  at::Tensor out = at::empty({rows, n}, keys.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return out;
  const int64_t* kp = k.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / chunks, c0 = (t % chunks) * kChunk;
      philox_normal_block(static_cast<uint64_t>(kp[row]), static_cast<uint64_t>(offset + c0),
                          std::min(kChunk, n - c0), op + row * n + c0);
    }
  });
  return out;
}

}  // namespace tempflow
