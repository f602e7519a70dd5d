// Lazy weight decay on the GPU: the catch-up of csrc/row_update.h (catch_up_row) for the row kernels of
// sparse_row_update and the fused masked backward. Same formulas as the CPU kernel and
// optembed_ext/reference.py lazy_decay_catch_up:
//   sgd:      w *= (1 - lr wd)^k
//   adagrad:  q = wd^2 mean(w^2);  w *= exp(-lr wd S(a, q, k));  a += k q
//   adam:     g = wd w;  m = b1^k m + (1 - b1^k) g;  v = b2^k v + (1 - b2^k) g^2;
//             w -= k lr / (1 - b1^(t-1)) m / (sqrt(v) / sqrt(1 - b2^(t-1)) + eps), an entry stopping at 0
// A group of G lanes owns a row. catch_up_steps: lane 0 reads and stamps last_step[r] and broadcasts k (every lane
// of the warp must call it). The per-unit catch-ups are applied by each lane to its own units and written back
// before the row's update reads them (same thread: no synchronisation needed).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace optembed {
namespace cuda {

struct LazyDecay {
  int64_t* last;  // (N,) last-updated steps, or nullptr (off)
  int64_t step;
  double lr, wd, beta1, beta2, eps;
  double prev_step_size, prev_inv_sqrt_bc2;  // Adam's bias corrections of step t - 1

  static LazyDecay make(int64_t* last, int64_t step, double lr, double wd, double beta1, double beta2, double eps) {
    LazyDecay z{last, step, lr, wd, beta1, beta2, eps, 0.0, 1.0};
    if (step >= 2) {
      z.prev_step_size = lr / (1.0 - std::pow(beta1, static_cast<double>(step - 1)));
      z.prev_inv_sqrt_bc2 = 1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step - 1)));
    }
    return z;
  }
};

// Skipped steps k of row r (0 when nothing is to catch up); stamps last_step[r] = step. `owner`: this group owns
// row r. Every lane of the warp must call it when z.last != nullptr.
__device__ __forceinline__ int64_t catch_up_steps(const LazyDecay& z, bool owner, int64_t r, int lane, int G) {
  long long k = 0;
  if (owner && lane == 0) {
    k = static_cast<long long>(z.step - 1 - z.last[r]);
    z.last[r] = z.step;
  }
  k = __shfl_sync(0xffffffffu, k, 0, G);
  return (z.wd != 0.0 && z.step >= 2 && k > 0) ? static_cast<int64_t>(k) : 0;
}

__device__ __forceinline__ double adagrad_decay_sum(double a0, double q, double k, double eps) {
  if (!(q > 0.0)) return k / (sqrt(a0) + eps);
  const double u0 = sqrt(a0 + 0.5 * q), u1 = sqrt(a0 + (k + 0.5) * q);
  return 2.0 * k / (u1 + u0) - (2.0 * eps / q) * log1p(k * q / ((u1 + u0) * (u0 + eps)));
}

// Multiplies the lane's units of row wrow (VEC elements each, lanes stride G) by f.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void scale_units(scalar_t* __restrict__ wrow, acc_t f, int64_t units, int lane, int G) {
  for (int64_t u = lane; u < units; u += G) {
    acc_t w[VEC];
    load_vec<VEC>(wrow + u * VEC, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) w[e] *= f;
    store_vec<VEC>(wrow + u * VEC, w);
  }
}

// SGD / Adam catch-up of the lane's units of row r (wrow; m, v: the row's Adam moments or nullptr), k >= 1.
template <bool kAdam, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void catch_up_units(const LazyDecay& z, int64_t k, scalar_t* __restrict__ wrow,
                                               acc_t* __restrict__ m, acc_t* __restrict__ v, int64_t units,
                                               int lane, int G) {
  const double kd = static_cast<double>(k);
  if constexpr (!kAdam) {
    scale_units<VEC>(wrow, static_cast<acc_t>(pow(1.0 - z.lr * z.wd, kd)), units, lane, G);
  } else {
    const acc_t b1k = static_cast<acc_t>(pow(z.beta1, kd)), b2k = static_cast<acc_t>(pow(z.beta2, kd));
    const acc_t ks = static_cast<acc_t>(kd) * static_cast<acc_t>(z.prev_step_size);
    const acc_t ibc2 = static_cast<acc_t>(z.prev_inv_sqrt_bc2), eps = static_cast<acc_t>(z.eps);
    const acc_t wd = static_cast<acc_t>(z.wd);
    for (int64_t u = lane; u < units; u += G) {
      const int64_t j0 = u * VEC;
      acc_t w[VEC];
      load_vec<VEC>(wrow + j0, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t g = wd * w[e];
        const acc_t mj = b1k * m[j0 + e] + (acc_t(1) - b1k) * g;
        const acc_t vj = b2k * v[j0 + e] + (acc_t(1) - b2k) * g * g;
        m[j0 + e] = mj;
        v[j0 + e] = vj;
        const acc_t w1 = w[e] - ks * mj / (acc_sqrt(vj) * ibc2 + eps);
        w[e] = ((w[e] > acc_t(0) && w1 < acc_t(0)) || (w[e] < acc_t(0) && w1 > acc_t(0))) ? acc_t(0) : w1;
      }
      store_vec<VEC>(wrow + j0, w);
    }
  }
}

// Row-wise Adagrad catch-up of row r (every lane of the warp must call it when z.last != nullptr; k = 0 or a
// non-owner group does nothing): updates state1[r] (lane 0) and the lane's units of the row.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void catch_up_adagrad(const LazyDecay& z, int64_t k, scalar_t* __restrict__ wrow,
                                                 acc_t* __restrict__ state1, int64_t r, int64_t D, int64_t units,
                                                 int lane, int G) {
  acc_t sq = acc_t(0);
  if (k > 0) {
    for (int64_t u = lane; u < units; u += G) {
      acc_t w[VEC];
      load_vec<VEC>(wrow + u * VEC, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sq += w[e] * w[e];
    }
  }
  sq = group_sum(sq, G);
  acc_t f = acc_t(1);
  if (k > 0 && lane == 0) {
    const double kd = static_cast<double>(k);
    const double a0 = static_cast<double>(state1[r]);
    const double q = z.wd * z.wd * static_cast<double>(sq / static_cast<acc_t>(D));
    state1[r] = static_cast<acc_t>(a0 + kd * q);
    f = static_cast<acc_t>(exp(-z.lr * z.wd * adagrad_decay_sum(a0, q, kd, z.eps)));
  }
  f = __shfl_sync(0xffffffffu, f, 0, G);
  if (k > 0) scale_units<VEC>(wrow, f, units, lane, G);
}

}  // namespace cuda
}  // namespace optembed
