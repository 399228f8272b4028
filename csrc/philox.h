// Counter-based normal noise shared by the C++ and CUDA kernels: the exact recipe of Triton's
// tl.randn(key, offset) and of the torch reference tempflow.rng.normal_from_keys.
//   (c0, c1, _, _) = Philox4x32-10(key = (key_lo, key_hi), counter = (i_lo, i_hi, 0, 0))
//   u = uint_to_uniform_float(c)          // int32 bitcast, ~x for negatives, times 4.6566127342e-10f
//   z = sqrt(-2 log(max(u1, 1e-7))) * cos(2 pi u2)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TEMPFLOW_HD __host__ __device__ __forceinline__
#define TEMPFLOW_UNROLL _Pragma("unroll")
#else
#define TEMPFLOW_HD inline
#define TEMPFLOW_UNROLL _Pragma("GCC unroll 10")
#endif

namespace tempflow {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

TEMPFLOW_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  TEMPFLOW_UNROLL
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

TEMPFLOW_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Element `index` of the stream with 64-bit key `key` (the bit pattern of the int64 the kernels are given).
TEMPFLOW_HD float philox_normal(uint64_t key, uint64_t index) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u,
                                  static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  float u1 = uint_to_uniform(r.c0);
  const float u2 = uint_to_uniform(r.c1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float rad = sqrtf(-2.0f * logf(u1));
  return rad * cosf(th);
}

}  // namespace tempflow
