// The per-row optimizer update shared by the CPU kernels that apply one: sparse_row_update (csrc/
// sparse_row_update.cpp) and the masked lookup's backward with the update fused in (masked_embedding_backward_update
// in csrc/masked_embedding.cpp). One row r with its summed gradient g (acc_t, D entries):
//   g += weight_decay * w[r]                                                    (if weight_decay != 0)
//   sgd:      w[r] -= lr * g
//   adagrad:  state1[r] += mean(g^2);  w[r] -= lr * g / (sqrt(state1[r]) + eps)          (row-wise)
//   adam:     m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//             w[r] -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)        (lazy: touched rows only)
// CPU only (SSE square roots).
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "sparse_row_update.h"

namespace optembed {

// out[j] = sqrt(in[j]); explicit SIMD because std::sqrt loops do not vectorise under -fmath-errno.
inline void sqrt_row(const float* in, float* out, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(out + j, _mm_sqrt_ps(_mm_loadu_ps(in + j)));
#endif
  for (; j < n; ++j) out[j] = std::sqrt(in[j]);
}
inline void sqrt_row(const double* in, double* out, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 2 <= n; j += 2) _mm_storeu_pd(out + j, _mm_sqrt_pd(_mm_loadu_pd(in + j)));
#endif
  for (; j < n; ++j) out[j] = std::sqrt(in[j]);
}

// Hyper-parameters in acc_t with Adam's bias corrections for step t folded in.
template <typename acc_t>
struct RowUpdateParams {
  acc_t lr, eps, beta1, beta2, wd, step_size, inv_sqrt_bc2;
  bool has_wd;
  RowUpdateParams(RowOptimizer opt, double lr_d, double eps_d, double beta1_d, double beta2_d, double wd_d,
                  int64_t step)
      : lr(static_cast<acc_t>(lr_d)),
        eps(static_cast<acc_t>(eps_d)),
        beta1(static_cast<acc_t>(beta1_d)),
        beta2(static_cast<acc_t>(beta2_d)),
        wd(static_cast<acc_t>(wd_d)),
        step_size(static_cast<acc_t>(lr_d)),
        inv_sqrt_bc2(acc_t(1)),
        has_wd(wd_d != 0.0) {
    if (opt == RowOptimizer::kAdam) {
      const double bc1 = 1.0 - std::pow(beta1_d, static_cast<double>(step));
      const double bc2 = 1.0 - std::pow(beta2_d, static_cast<double>(step));
      step_size = static_cast<acc_t>(lr_d / bc1);
      inv_sqrt_bc2 = static_cast<acc_t>(1.0 / std::sqrt(bc2));
    }
  }
};

// Applies the update of row r (weight row wr, summed gradient g, which it may modify; tmp: D scratch entries).
template <RowOptimizer kOpt, typename scalar_t, typename acc_t>
inline void apply_row_update(scalar_t* __restrict__ wr, acc_t* __restrict__ g, int64_t r, int64_t D,
                             acc_t* __restrict__ s1, acc_t* __restrict__ s2, acc_t* __restrict__ tmp,
                             const RowUpdateParams<acc_t>& hp) {
  if (hp.has_wd) {
    for (int64_t j = 0; j < D; ++j) g[j] += hp.wd * static_cast<acc_t>(wr[j]);
  }
  if constexpr (kOpt == RowOptimizer::kSGD) {
    for (int64_t j = 0; j < D; ++j) wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) - hp.lr * g[j]);
  } else if constexpr (kOpt == RowOptimizer::kAdagrad) {
    acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable without -ffast-math
    int64_t j0 = 0;
    for (; j0 + 8 <= D; j0 += 8) {
      for (int u = 0; u < 8; ++u) part[u] += g[j0 + u] * g[j0 + u];
    }
    for (; j0 < D; ++j0) part[0] += g[j0] * g[j0];
    const acc_t sq = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    const acc_t acc = s1[r] + sq / static_cast<acc_t>(D);
    s1[r] = acc;
    const acc_t mult = hp.lr / (std::sqrt(acc) + hp.eps);
    for (int64_t j = 0; j < D; ++j) wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) - mult * g[j]);
  } else {
    acc_t* m = s1 + r * D;
    acc_t* v = s2 + r * D;
    for (int64_t j = 0; j < D; ++j) {
      m[j] = hp.beta1 * m[j] + (acc_t(1) - hp.beta1) * g[j];
      v[j] = hp.beta2 * v[j] + (acc_t(1) - hp.beta2) * g[j] * g[j];
    }
    sqrt_row(v, tmp, D);
    for (int64_t j = 0; j < D; ++j) {
      const acc_t denom = tmp[j] * hp.inv_sqrt_bc2 + hp.eps;
      wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) - hp.step_size * m[j] / denom);
    }
  }
}

// Binds `kOpt` (a constexpr RowOptimizer) for the body.
#define OPTEMBED_ROW_OPTIMIZER_SWITCH(OPT, CONST_NAME, ...)                                             \
  [&] {                                                                                                 \
    switch (OPT) {                                                                                      \
      case ::optembed::RowOptimizer::kSGD: {                                                            \
        constexpr static ::optembed::RowOptimizer CONST_NAME = ::optembed::RowOptimizer::kSGD;          \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case ::optembed::RowOptimizer::kAdagrad: {                                                        \
        constexpr static ::optembed::RowOptimizer CONST_NAME = ::optembed::RowOptimizer::kAdagrad;      \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      default: {                                                                                        \
        constexpr static ::optembed::RowOptimizer CONST_NAME = ::optembed::RowOptimizer::kAdam;         \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
    }                                                                                                   \
  }()

}  // namespace optembed
