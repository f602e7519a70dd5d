// The per-row optimizer update shared by the CPU kernels that apply one: sparse_row_update (csrc/
// sparse_row_update.cpp) and the masked lookup's backward with the update fused in (masked_embedding_backward_update
// in csrc/masked_embedding.cpp). One row r with its summed gradient g (acc_t, D entries):
//   g += weight_decay * w[r]                                                    (if weight_decay != 0)
//   sgd:      w[r] -= lr * g
//   adagrad:  state1[r] += mean(g^2);  w[r] -= lr * g / (sqrt(state1[r]) + eps)          (row-wise)
//   adam:     m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//             w[r] -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)        (lazy: touched rows only)
// Lazy weight decay (a last_step (N,) int64 array given): before that update, a row last updated at step l < t - 1
// first catches up on the k = t - 1 - l steps it skipped, i.e. the steps in which a dense optimizer would have
// applied the decay gradient wd * w[r] alone (catch_up_row below; exact for SGD, an approximation for Adagrad and
// Adam); then last_step[r] = t. The formulas are written out in optembed_ext/reference.py (lazy_decay_catch_up).
// CPU only (SSE square roots).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
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
  // lazy weight decay: the step t, and Adam's bias-corrected step size / 1 / sqrt(bc2) of step t - 1 (the last
  // skipped step of a catch-up)
  int64_t step;
  double lr_d, wd_d, beta1_d, beta2_d, eps_d;
  acc_t prev_step_size, prev_inv_sqrt_bc2;
  RowUpdateParams(RowOptimizer opt, double lr_d, double eps_d, double beta1_d, double beta2_d, double wd_d,
                  int64_t step)
      : lr(static_cast<acc_t>(lr_d)),
        eps(static_cast<acc_t>(eps_d)),
        beta1(static_cast<acc_t>(beta1_d)),
        beta2(static_cast<acc_t>(beta2_d)),
        wd(static_cast<acc_t>(wd_d)),
        step_size(static_cast<acc_t>(lr_d)),
        inv_sqrt_bc2(acc_t(1)),
        has_wd(wd_d != 0.0),
        step(step),
        lr_d(lr_d),
        wd_d(wd_d),
        beta1_d(beta1_d),
        beta2_d(beta2_d),
        eps_d(eps_d),
        prev_step_size(acc_t(0)),
        prev_inv_sqrt_bc2(acc_t(1)) {
    if (opt == RowOptimizer::kAdam) {
      const double bc1 = 1.0 - std::pow(beta1_d, static_cast<double>(step));
      const double bc2 = 1.0 - std::pow(beta2_d, static_cast<double>(step));
      step_size = static_cast<acc_t>(lr_d / bc1);
      inv_sqrt_bc2 = static_cast<acc_t>(1.0 / std::sqrt(bc2));
      if (step >= 2) {
        const double pbc1 = 1.0 - std::pow(beta1_d, static_cast<double>(step - 1));
        const double pbc2 = 1.0 - std::pow(beta2_d, static_cast<double>(step - 1));
        prev_step_size = static_cast<acc_t>(lr_d / pbc1);
        prev_inv_sqrt_bc2 = static_cast<acc_t>(1.0 / std::sqrt(pbc2));
      }
    }
  }
};

// sum over the k skipped steps s of 1 / (sqrt(a0 + s q) + eps), as the integral over s in [1/2, k + 1/2]
// (optembed_ext/reference.py _adagrad_decay_sum; written without cancellation).
inline double adagrad_decay_sum(double a0, double q, double k, double eps) {
  if (!(q > 0.0)) return k / (std::sqrt(a0) + eps);
  const double u0 = std::sqrt(a0 + 0.5 * q), u1 = std::sqrt(a0 + (k + 0.5) * q);
  return 2.0 * k / (u1 + u0) - (2.0 * eps / q) * std::log1p(k * q / ((u1 + u0) * (u0 + eps)));
}

// Lazy weight decay: catches row r (weight row wr) up on the k >= 1 steps it skipped, in which a dense optimizer
// would have applied the decay gradient wd * w alone (optembed_ext/reference.py lazy_decay_catch_up, same formulas):
//   sgd:      w *= (1 - lr * wd)^k                                                     (exact)
//   adagrad:  q = wd^2 * mean(w^2);  w *= exp(-lr * wd * sum_{s=1..k} 1 / (sqrt(a + s q) + eps));  a += k q
//             (w held over the window; the sum as a closed-form integral, adagrad_decay_sum)
//   adam:     g = wd * w;  m = beta1^k m + (1 - beta1^k) g;  v = beta2^k v + (1 - beta2^k) g^2;
//             w -= k * lr / (1 - beta1^(t-1)) * m / (sqrt(v) / sqrt(1 - beta2^(t-1)) + eps), an entry stopping at 0
//             (g frozen at the window's start; k steps the size of the window's last one)
template <RowOptimizer kOpt, typename scalar_t, typename acc_t>
inline void catch_up_row(scalar_t* __restrict__ wr, int64_t r, int64_t D, int64_t k, acc_t* __restrict__ s1,
                         acc_t* __restrict__ s2, acc_t* __restrict__ tmp, const RowUpdateParams<acc_t>& hp) {
  const double kd = static_cast<double>(k);
  if constexpr (kOpt == RowOptimizer::kSGD) {
    const acc_t f = static_cast<acc_t>(std::pow(1.0 - hp.lr_d * hp.wd_d, kd));
    for (int64_t j = 0; j < D; ++j) wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) * f);
  } else if constexpr (kOpt == RowOptimizer::kAdagrad) {
    acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j0 = 0;
    for (; j0 + 8 <= D; j0 += 8) {
      for (int u = 0; u < 8; ++u) {
        const acc_t x = static_cast<acc_t>(wr[j0 + u]);
        part[u] += x * x;
      }
    }
    for (; j0 < D; ++j0) {
      const acc_t x = static_cast<acc_t>(wr[j0]);
      part[0] += x * x;
    }
    const acc_t sq = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    const double a0 = static_cast<double>(s1[r]);
    const double q = hp.wd_d * hp.wd_d * static_cast<double>(sq / static_cast<acc_t>(D));
    s1[r] = static_cast<acc_t>(a0 + kd * q);
    const acc_t f = static_cast<acc_t>(std::exp(-hp.lr_d * hp.wd_d * adagrad_decay_sum(a0, q, kd, hp.eps_d)));
    for (int64_t j = 0; j < D; ++j) wr[j] = static_cast<scalar_t>(static_cast<acc_t>(wr[j]) * f);
  } else {
    const acc_t b1k = static_cast<acc_t>(std::pow(hp.beta1_d, kd));
    const acc_t b2k = static_cast<acc_t>(std::pow(hp.beta2_d, kd));
    const acc_t ks = static_cast<acc_t>(kd) * hp.prev_step_size;
    acc_t* m = s1 + r * D;
    acc_t* v = s2 + r * D;
    for (int64_t j = 0; j < D; ++j) {
      const acc_t g = hp.wd * static_cast<acc_t>(wr[j]);
      m[j] = b1k * m[j] + (acc_t(1) - b1k) * g;
      v[j] = b2k * v[j] + (acc_t(1) - b2k) * g * g;
    }
    sqrt_row(v, tmp, D);
    for (int64_t j = 0; j < D; ++j) {
      const acc_t w0 = static_cast<acc_t>(wr[j]);
      const acc_t w1 = w0 - ks * m[j] / (tmp[j] * hp.prev_inv_sqrt_bc2 + hp.eps);
      wr[j] = static_cast<scalar_t>((w0 > acc_t(0) && w1 < acc_t(0)) || (w0 < acc_t(0) && w1 > acc_t(0)) ? acc_t(0)
                                                                                                          : w1);
    }
  }
}

// Applies the update of row r (weight row wr, summed gradient g, which it may modify; tmp: D scratch entries).
// last (lazy weight decay, or nullptr): the (N,) last-updated steps; the row is caught up first, then stamped.
template <RowOptimizer kOpt, typename scalar_t, typename acc_t>
inline void apply_row_update(scalar_t* __restrict__ wr, acc_t* __restrict__ g, int64_t r, int64_t D,
                             acc_t* __restrict__ s1, acc_t* __restrict__ s2, acc_t* __restrict__ tmp,
                             const RowUpdateParams<acc_t>& hp, int64_t* __restrict__ last = nullptr) {
  if (last != nullptr) {
    const int64_t k = hp.step - 1 - last[r];
    if (k > 0 && hp.has_wd && hp.step >= 2) catch_up_row<kOpt>(wr, r, D, k, s1, s2, tmp, hp);
    last[r] = hp.step;
  }
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
