// Fused K-branch SDE step, K-action log-probs (+ exact-KL sums) and their backward, on CPU.
//
// Layout: a batch row b holds D contiguous elements (any latent shape, flattened); branch tensors are (B, K, D).
// Work is cut into (row, block of kBlock elements) tasks run by at::parallel_for. Each task keeps the block's
// mean in a small fp32 buffer, so x and v are read once, and writes one partial sum per (row, block, branch);
// partials are added in a fixed order afterwards, so results do not depend on the number of threads.
// Maths is fp32 whatever the input dtypes (fp32, bf16, fp16); the library is built with -ffp-contract=off so that
// `mean + std * eps` rounds exactly like the torch reference.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu/ops.h"

namespace tempflow {
namespace {

constexpr int64_t kBlock = 2048;

inline int64_t num_blocks(int64_t d) { return (d + kBlock - 1) / kBlock; }

// Outputs are allocated uninitialised; with TEMPFLOW_POISON_OUTPUTS=1 (tests) they start as NaN instead, so an
// element a kernel forgets to write fails loudly.
at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const char* flag = std::getenv("TEMPFLOW_POISON_OUTPUTS");
  if (flag != nullptr && std::strcmp(flag, "0") != 0) return at::full(sizes, NAN, opts);
  return at::empty(sizes, opts);
}

// ---- argument checks (once, at the API edge) ------------------------------------------------------------------

void check_rows(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", s);
}

void check_2d(const at::Tensor& t, const char* name, int64_t b, int64_t d) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == b && t.size(1) == d, name, " must have shape (", b, ", ", d, "), got ",
              t.sizes());
}

void check_3d(const at::Tensor& t, const char* name, int64_t b, int64_t k, int64_t d) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == b && t.size(1) == k && t.size(2) == d, name, " must have shape (", b,
              ", ", k, ", ", d, "), got ", t.sizes());
}

// Sum partial[(b * nblk + blk) * width + j] over blk, in block order, into out[b * width + j].
at::Tensor reduce_partials(const std::vector<float>& partial, int64_t rows, int64_t nblk, int64_t width,
                           const at::TensorOptions& opts) {
  at::Tensor out = alloc({rows, width}, opts.dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t j = 0; j < width; ++j) {
      double acc = 0.0;
      for (int64_t blk = 0; blk < nblk; ++blk) acc += partial[(b * nblk + blk) * width + j];
      o[b * width + j] = static_cast<float>(acc);
    }
  }
  return out;
}

// mean[i] = cx * x[i] + cv * v[i] for one block (the torch reference: addcmul(x * cx, v, cv)).
template <typename TS, typename TV>
inline void block_mean(const TS* x, const TV* v, float cx, float cv, int64_t n, float* m) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(x[i]) * cx;
    const float c = static_cast<float>(v[i]) * cv;
    m[i] = a + c;
  }
}

// ---- kernels ------------------------------------------------------------------------------------------------

template <typename TS, typename TV, typename TA>
void sample_kernel(const TS* x, const TV* v, const float* cx, const float* cv, const float* sd, const TA* noise,
                   const int64_t* keys, int64_t B, int64_t K, int64_t D, float* out, float* mean_out,
                   std::vector<float>& partial) {
  const int64_t nblk = num_blocks(D);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> m(kBlock), e(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, blk = t % nblk, i0 = blk * kBlock, n = std::min(kBlock, D - i0);
      block_mean(x + b * D + i0, v + b * D + i0, cx[b], cv[b], n, m.data());
      if (mean_out != nullptr) std::copy(m.begin(), m.begin() + n, mean_out + b * D + i0);
      const float s = sd[b];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = b * K + k;
        if (noise != nullptr) {
          const TA* nz = noise + row * D + i0;
          for (int64_t i = 0; i < n; ++i) e[i] = static_cast<float>(nz[i]);
        } else {
          philox_normal_block(static_cast<uint64_t>(keys[row]), static_cast<uint64_t>(i0), n, e.data());
        }
        float* o = out + row * D + i0;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; ++i) {
          const float val = m[i] + s * e[i];
          o[i] = val;
          const float d = val - m[i];
          acc += d * d;
        }
        partial[(b * nblk + blk) * K + k] = acc;
      }
    }
  });
}

template <typename TS, typename TV, typename TA>
void logp_kernel(const TV* v, const TS* x, const TA* actions, const float* cx, const float* cv, const TV* v_ref,
                 int64_t B, int64_t K, int64_t D, std::vector<float>& partial, std::vector<float>& partial_kl) {
  const int64_t nblk = num_blocks(D);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> m(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, blk = t % nblk, i0 = blk * kBlock, n = std::min(kBlock, D - i0);
      block_mean(x + b * D + i0, v + b * D + i0, cx[b], cv[b], n, m.data());
      for (int64_t k = 0; k < K; ++k) {
        const TA* a = actions + (b * K + k) * D + i0;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; ++i) {
          const float d = static_cast<float>(a[i]) - m[i];
          acc += d * d;
        }
        partial[(b * nblk + blk) * K + k] = acc;
      }
      float kl = 0.f;
      if (v_ref != nullptr) {
        const TV* vb = v + b * D + i0;
        const TV* rb = v_ref + b * D + i0;
#pragma omp simd reduction(+ : kl)
        for (int64_t i = 0; i < n; ++i) {
          const float d = static_cast<float>(vb[i]) - static_cast<float>(rb[i]);
          kl += d * d;
        }
      }
      partial_kl[b * nblk + blk] = kl;
    }
  });
}

template <typename TS, typename TV, typename TA>
void logp_backward_kernel(const float* alpha, const float* beta, const TV* v, const TS* x, const TA* actions,
                          const float* cx, const float* cv, const TV* v_ref, int64_t B, int64_t K, int64_t D,
                          TV* grad) {
  const int64_t nblk = num_blocks(D);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> m(kBlock), g(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, blk = t % nblk, i0 = blk * kBlock, n = std::min(kBlock, D - i0);
      const TV* vb = v + b * D + i0;
      block_mean(x + b * D + i0, vb, cx[b], cv[b], n, m.data());
      if (v_ref != nullptr) {
        const TV* rb = v_ref + b * D + i0;
        const float be = beta[b];
        for (int64_t i = 0; i < n; ++i) g[i] = be * (static_cast<float>(vb[i]) - static_cast<float>(rb[i]));
      } else {
        std::fill(g.begin(), g.begin() + n, 0.f);
      }
      for (int64_t k = 0; k < K; ++k) {
        const TA* a = actions + (b * K + k) * D + i0;
        const float al = alpha[b * K + k];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] += al * (static_cast<float>(a[i]) - m[i]);
      }
      TV* gb = grad + b * D + i0;
      for (int64_t i = 0; i < n; ++i) gb[i] = static_cast<TV>(g[i]);
    }
  });
}

// Dispatch over the state dtype (x), the velocity dtype (v, v_ref) and the branch dtype (noise, actions), the
// last being either fp32 or the state's dtype (anything else is converted to fp32 at the API edge).
#define TEMPFLOW_CASES(...)                           \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

#define TEMPFLOW_DISPATCH_SVA(STATE_TYPE, VEL_TYPE, BRANCH_IS_FLOAT, NAME, ...)                        \
  AT_DISPATCH_SWITCH(STATE_TYPE, NAME, TEMPFLOW_CASES([&] {                                             \
                       using state_t = scalar_t;                                                       \
                       AT_DISPATCH_SWITCH(VEL_TYPE, NAME, TEMPFLOW_CASES([&] {                          \
                                            using vel_t = scalar_t;                                    \
                                            if (BRANCH_IS_FLOAT) {                                     \
                                              using branch_t = float;                                  \
                                              __VA_ARGS__();                                           \
                                            } else {                                                   \
                                              using branch_t = state_t;                                \
                                              __VA_ARGS__();                                           \
                                            }                                                          \
                                          }));                                                         \
                     }))

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_sample_cpu(const at::Tensor& x_in, const at::Tensor& v_in,
                                                                 const at::Tensor& cx, const at::Tensor& cv,
                                                                 const at::Tensor& std,
                                                                 const std::optional<at::Tensor>& noise_in,
                                                                 const std::optional<at::Tensor>& keys_in, int64_t K,
                                                                 bool return_mean) {
  TORCH_CHECK(x_in.dim() == 2, "branch_sample: x must be (B, D), got ", x_in.sizes());
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(K >= 1, "branch_sample: K must be >= 1, got ", K);
  check_2d(x_in, "branch_sample: x", B, D);
  check_2d(v_in, "branch_sample: v", B, D);
  check_rows(cx, "branch_sample: coef_x", B);
  check_rows(cv, "branch_sample: coef_v", B);
  check_rows(std, "branch_sample: std", B);
  TORCH_CHECK(noise_in.has_value() != keys_in.has_value(), "branch_sample: pass exactly one of noise and keys");
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  at::Tensor noise, keys;
  if (noise_in) {
    check_3d(*noise_in, "branch_sample: noise", B, K, D);
    noise = branch_input(*noise_in, x);
  } else {
    TORCH_CHECK(keys_in->scalar_type() == at::kLong && keys_in->dim() == 2 && keys_in->size(0) == B &&
                    keys_in->size(1) == K,
                "branch_sample: keys must be int64 of shape (", B, ", ", K, "), got ", keys_in->scalar_type(), " ",
                keys_in->sizes());
    keys = keys_in->contiguous();
  }
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor out = alloc({B, K, D}, opts);
  at::Tensor mean = return_mean ? alloc({B, D}, opts) : at::empty({0}, opts);
  std::vector<float> partial(B * num_blocks(D) * K);
  const bool branch_float = !noise.defined() || noise.scalar_type() == at::kFloat;
  TEMPFLOW_DISPATCH_SVA(x.scalar_type(), v.scalar_type(), branch_float, "branch_sample", [&] {
    sample_kernel<state_t, vel_t, branch_t>(x.data_ptr<state_t>(), v.data_ptr<vel_t>(), cx.data_ptr<float>(),
                                  cv.data_ptr<float>(), std.data_ptr<float>(),
                                  noise.defined() ? noise.data_ptr<branch_t>() : nullptr,
                                  keys.defined() ? keys.data_ptr<int64_t>() : nullptr, B, K, D,
                                  out.data_ptr<float>(), return_mean ? mean.data_ptr<float>() : nullptr, partial);
  });
  return {out, reduce_partials(partial, B, num_blocks(D), K, opts), mean};
}

std::tuple<at::Tensor, at::Tensor> branch_logp_cpu(const at::Tensor& v_in, const at::Tensor& x_in,
                                                   const at::Tensor& actions_in, const at::Tensor& cx,
                                                   const at::Tensor& cv, const std::optional<at::Tensor>& v_ref_in) {
  TORCH_CHECK(actions_in.dim() == 3, "branch_logp: actions must be (B, K, D), got ", actions_in.sizes());
  const int64_t B = actions_in.size(0), K = actions_in.size(1), D = actions_in.size(2);
  check_2d(v_in, "branch_logp: v", B, D);
  check_2d(x_in, "branch_logp: x", B, D);
  check_3d(actions_in, "branch_logp: actions", B, K, D);
  check_rows(cx, "branch_logp: coef_x", B);
  check_rows(cv, "branch_logp: coef_v", B);
  const at::Tensor v = v_in.contiguous(), x = x_in.contiguous();
  const at::Tensor actions = branch_input(actions_in, x);
  at::Tensor v_ref;
  if (v_ref_in) {
    check_2d(*v_ref_in, "branch_logp: v_ref", B, D);
    v_ref = v_ref_in->to(v.scalar_type()).contiguous();
  }
  const int64_t nblk = num_blocks(D);
  std::vector<float> partial(B * nblk * K), partial_kl(B * nblk);
  TEMPFLOW_DISPATCH_SVA(x.scalar_type(), v.scalar_type(), actions.scalar_type() == at::kFloat, "branch_logp", [&] {
    logp_kernel<state_t, vel_t, branch_t>(v.data_ptr<vel_t>(), x.data_ptr<state_t>(), actions.data_ptr<branch_t>(),
                                cx.data_ptr<float>(), cv.data_ptr<float>(),
                                v_ref.defined() ? v_ref.data_ptr<vel_t>() : nullptr, B, K, D, partial, partial_kl);
  });
  const auto opts = x.options();
  return {reduce_partials(partial, B, nblk, K, opts), reduce_partials(partial_kl, B, nblk, 1, opts).reshape({B})};
}

at::Tensor branch_logp_backward_cpu(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& v_in,
                                    const at::Tensor& x_in, const at::Tensor& actions_in, const at::Tensor& cx,
                                    const at::Tensor& cv, const std::optional<at::Tensor>& v_ref_in) {
  TORCH_CHECK(actions_in.dim() == 3, "branch_logp_backward: actions must be (B, K, D), got ", actions_in.sizes());
  const int64_t B = actions_in.size(0), K = actions_in.size(1), D = actions_in.size(2);
  check_2d(v_in, "branch_logp_backward: v", B, D);
  check_2d(x_in, "branch_logp_backward: x", B, D);
  check_rows(cx, "branch_logp_backward: coef_x", B);
  check_rows(cv, "branch_logp_backward: coef_v", B);
  check_rows(beta, "branch_logp_backward: beta", B);
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.dim() == 2 && alpha.size(0) == B && alpha.size(1) == K,
              "branch_logp_backward: alpha must be float32 (", B, ", ", K, "), got ", alpha.sizes());
  const at::Tensor v = v_in.contiguous(), x = x_in.contiguous();
  const at::Tensor actions = branch_input(actions_in, x);
  const at::Tensor al = alpha.contiguous();
  at::Tensor v_ref;
  if (v_ref_in) {
    check_2d(*v_ref_in, "branch_logp_backward: v_ref", B, D);
    v_ref = v_ref_in->to(v.scalar_type()).contiguous();
  }
  at::Tensor grad = alloc({B, D}, v.options());
  TEMPFLOW_DISPATCH_SVA(x.scalar_type(), v.scalar_type(), actions.scalar_type() == at::kFloat, "branch_logp_backward", [&] {
    logp_backward_kernel<state_t, vel_t, branch_t>(al.data_ptr<float>(), beta.data_ptr<float>(), v.data_ptr<vel_t>(),
                                         x.data_ptr<state_t>(), actions.data_ptr<branch_t>(), cx.data_ptr<float>(),
                                         cv.data_ptr<float>(), v_ref.defined() ? v_ref.data_ptr<vel_t>() : nullptr,
                                         B, K, D, grad.data_ptr<vel_t>());
  });
  return grad;
}

}  // namespace tempflow
