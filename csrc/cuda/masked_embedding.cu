// masked_embedding (CUDA): fused gather + row p-norm + threshold row mask + dimension prefix mask + OOV blend,
// and its backward (weight / threshold / OOV gradients, long-tail straight-through estimator).
// Semantics: optembed_ext/reference.py and the schema in csrc/masked_embedding.cpp.
//
// Forward, one kernel. One group of G lanes per lookup position (b, f) (G = power of two covering the row's
// 16-byte units, at most a warp): the group gathers row r = indices[b, f] with 16-byte vector loads (scalar
// fallback when D is not a multiple of the vector width or a pointer is misaligned), reduces ||w_r||_p with
// warp shuffles in fp32 (fp64 for float64 weights), forms m = (norm - threshold[f] > 0) and writes
//   out[b, f, j] = j < k ? (m ? w[r, j] : oov[f, j] or 0) : 0,      k = dims[f] / dims[b, f] / D
// and norm[b, f]. Memory: each looked-up row is read from HBM once (the second pass hits L1), out written once.
// Out-of-range indices never touch memory (the row yields zeros). With check_indices=True the kernel also records
// the first out-of-range index, the first dims value outside [0, D] and the first NaN threshold in error slots,
// which the host reads after the launch (one small copy) and raises as on the CPU, naming the argument. With
// check_indices=False nothing is synchronised: dims are clamped to [0, D] and a NaN threshold propagates NaN to
// its field. Non-finite values (as on the CPU and in the reference): x = norm - threshold[f] NaN (NaN in the row,
// NaN threshold, inf - inf) gives out[b, f, :k] = NaN, m = NaN and H(x) = NaN in the backward; x = +-inf is a
// plain prune / keep with H = 0 (no STE term).
//
// Backward, per position (b, f) with s = sum_{j<k} g[j] * (w[r, j] - oov[f, j]) and h = H(norm - threshold[f]):
//   c[j] = m * g[j] * [j < k] + s * h * dn/dw[r, j]      (contribution of the position to grad_weight[r])
//   tpos = -s * h                                        (contribution to grad_threshold[f])
// Kernel A (one group per position, same mapping as forward) computes c and tpos in fp32/fp64 and either
//   - writes c into a per-position buffer (P, D): the result itself when sparse=True (cast to the weight
//     dtype), or the input of the deterministic segment reduction;
//   - or (deterministic=False, dense) atomically adds c into the (N, D) accumulator.
// Deterministic dense (and every float16 / bfloat16 dense backward, which would otherwise need a full (N, D)
// float32 atomic accumulator): a stable radix sort of the flat indices over only the bits rows need (sort_rows.cuh)
// gives (row, position) pairs ordered by row then position; runs of a hot row are cut into chunks of kRowChunk
// slots whose partial sums are formed in parallel (chunk_partial_kernel); kernel B assigns one group per sorted
// slot, the group at the head of each run adds the run's chunk partials in ascending order and writes
// grad_weight[row] once; no float atomics anywhere. The fused update (masked_embedding_backward_update) runs the
// same pipeline and applies the optimizer to the row instead of writing a gradient. grad_threshold = tpos.view(B, F).sum(0), grad_oov = per-(field, column)
// partial sums over batch chunks (kernel C) followed by a sum over chunks: both fixed-order reductions, so
// both are deterministic in every mode.
// int32 and int64 ids are read as they are (the kernels are templated on the index type; no int64 copy).
// The backward trusts the indices / dims the forward validated (it never synchronises): an out-of-range index
// contributes nothing, dims are clamped to [0, D].
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "lazy_decay.cuh"
#include "sort_rows.cuh"
#include "sparse_row_update.h"

namespace optembed {
namespace cuda {
namespace {

// k = number of leading dimensions kept for position (b, f); dims_stride_b is F for (B, F) dims, 0 for (F,).
template <bool HAS_DIMS>
__device__ __forceinline__ int64_t raw_dims(const int64_t* __restrict__ dims, int64_t dims_stride_b, int64_t b,
                                            int64_t f, int64_t D) {
  if constexpr (HAS_DIMS) {
    return dims[b * dims_stride_b + f];
  } else {
    return D;
  }
}

template <bool HAS_DIMS>
__device__ __forceinline__ int64_t kept_dims(const int64_t* __restrict__ dims, int64_t dims_stride_b, int64_t b,
                                             int64_t f, int64_t D) {
  const int64_t k = raw_dims<HAS_DIMS>(dims, dims_stride_b, b, f, D);
  return k < 0 ? 0 : (k > D ? D : k);
}

// Error slots of the forward (smallest failing position in each).
constexpr int kErrIndex = 0;      // lookup position with an out-of-range index
constexpr int kErrDims = 1;       // lookup position with dims outside [0, D]
constexpr int kErrThreshold = 2;  // field with a NaN threshold

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t, int P, bool HAS_DIMS, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) masked_embedding_forward_kernel(
    const scalar_t* __restrict__ weight, const index_t* __restrict__ indices,
    const at::opmath_type<scalar_t>* __restrict__ threshold,  // (F,) or nullptr
    const int64_t* __restrict__ dims, int64_t dims_stride_b, const scalar_t* __restrict__ oov,
    scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ norm_out, int64_t* __restrict__ errors,
    int64_t R, int64_t F, int64_t N, int64_t D, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const bool active = pos < R;
  const int64_t units = D / VEC;

  int64_t r = 0;
  bool valid = false;
  if (active) {
    r = static_cast<int64_t>(indices[pos]);
    valid = r >= 0 && r < N;
    if (errors != nullptr && lane == 0) {  // check_indices: record, the host raises after the launch
      if (!valid) record_error(errors + kErrIndex, pos);
      if constexpr (HAS_DIMS) {
        const int64_t k = raw_dims<HAS_DIMS>(dims, dims_stride_b, pos / F, pos % F, D);
        if (k < 0 || k > D) record_error(errors + kErrDims, pos);
      }
      if (threshold != nullptr && pos < F && threshold[pos] != threshold[pos]) {
        record_error(errors + kErrThreshold, pos);
      }
    }
  }
  const scalar_t* wrow = weight + (valid ? r : 0) * D;

  // Pass 1: ||w_r||_p (every lane reaches the shuffle).
  acc_t acc = acc_t(0);
  if (valid) {
    for (int64_t u = lane; u < units; u += G) {
      acc_t w[VEC];
      load_vec<VEC>(wrow + u * VEC, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += P == 1 ? (w[e] < acc_t(0) ? -w[e] : w[e]) : w[e] * w[e];
    }
  }
  acc = group_sum(acc, G);
  if (!active) return;
  const acc_t norm = P == 1 ? acc : acc_sqrt(acc);
  const int64_t f = pos % F;
  if (lane == 0) norm_out[pos] = norm;

  // Pass 2: masked / blended copy (a NaN x = norm - threshold gives NaN on [0, k)).
  const acc_t x = threshold == nullptr ? acc_t(1) : norm - threshold[f];
  const bool nan_x = valid && x != x;
  const bool keep = valid && x > acc_t(0);
  const bool use_oov = HAS_OOV && valid && !keep;
  const int64_t k = kept_dims<HAS_DIMS>(dims, dims_stride_b, pos / F, f, D);
  const scalar_t* src = keep ? wrow : (use_oov ? oov + f * D : nullptr);
  scalar_t* orow = out + pos * D;
  for (int64_t u = lane; u < units; u += G) {
    acc_t v[VEC];
    const int64_t j0 = u * VEC;
    if (nan_x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = j0 + e < k ? x : acc_t(0);
    } else if (src != nullptr && j0 < k) {
      load_vec<VEC>(src + j0, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = j0 + e < k ? v[e] : acc_t(0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = acc_t(0);
    }
    store_vec<VEC>(orow + j0, v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel A: per-position contributions
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t, int P, bool HAS_DIMS, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) masked_embedding_backward_rows_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight, const index_t* __restrict__ indices,
    const at::opmath_type<scalar_t>* __restrict__ norm, const at::opmath_type<scalar_t>* __restrict__ threshold,
    const int64_t* __restrict__ dims, int64_t dims_stride_b, const scalar_t* __restrict__ oov,
    at::opmath_type<scalar_t>* __restrict__ pos_grad,     // (R, D) per-position rows, or nullptr
    at::opmath_type<scalar_t>* __restrict__ atomic_grad,  // (N, D) accumulator, or nullptr
    at::opmath_type<scalar_t>* __restrict__ pos_tgrad,    // (R,) -s*h, or nullptr (no threshold)
    int64_t R, int64_t F, int64_t N, int64_t D, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const bool active = pos < R;
  const int64_t units = D / VEC;

  int64_t r = 0, f = 0, k = 0;
  bool valid = false;
  acc_t h = acc_t(0), n = acc_t(0);
  bool keep = true, nan_x = false;
  if (active) {
    r = static_cast<int64_t>(indices[pos]);
    valid = r >= 0 && r < N;
    f = pos % F;
    k = kept_dims<HAS_DIMS>(dims, dims_stride_b, pos / F, f, D);
    n = norm[pos];
    if (threshold != nullptr) {
      const acc_t x = n - threshold[f];
      keep = x > acc_t(0);
      nan_x = x != x;                  // m = NaN: the direct term m * g is NaN on [0, k)
      h = step_ste_grad<acc_t>(x);     // NaN for NaN x, 0 for |x| > 1 and x = +-inf
    }
  }
  const scalar_t* wrow = weight + (valid ? r : 0) * D;
  const scalar_t* grow = grad_out + (active ? pos : 0) * D;
  const scalar_t* orow = HAS_OOV ? oov + f * D : nullptr;

  // s = sum_{j<k} g[j] * (w[r, j] - oov[f, j]); only needed where h != 0. `threshold` is uniform per launch.
  acc_t s = acc_t(0);
  if (threshold != nullptr) {
    if (valid && h != acc_t(0)) {
      for (int64_t u = lane; u < units; u += G) {
        const int64_t j0 = u * VEC;
        if (j0 >= k) break;
        acc_t g[VEC], w[VEC];
        load_vec<VEC>(grow + j0, g);
        load_vec<VEC>(wrow + j0, w);
        if constexpr (HAS_OOV) {
          acc_t o[VEC];
          load_vec<VEC>(orow + j0, o);
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[e] -= o[e];
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += j0 + e < k ? g[e] * w[e] : acc_t(0);
      }
    }
    s = group_sum(s, G);
  }
  if (!active) return;
  const acc_t sh = s * h;
  if (pos_tgrad != nullptr && lane == 0) pos_tgrad[pos] = -sh;

  acc_t* dst = nullptr;
  if (pos_grad != nullptr) {
    dst = pos_grad + pos * D;
  } else if (valid) {
    dst = atomic_grad + r * D;
  }
  if (dst == nullptr) return;
  // Norm term s * h * dn/dw: none where h = 0 (strong zero, even for inf rows) or, for p = 2, at n = 0.
  const bool need_w = valid && sh != acc_t(0) && (P == 1 || n != acc_t(0));
  const acc_t inv_n = (P == 2 && n != acc_t(0)) ? acc_t(1) / n : acc_t(0);
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t c[VEC];
    if (valid && nan_x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) c[e] = j0 + e < k ? n - threshold[f] : acc_t(0);  // NaN
    } else if (valid && keep && j0 < k) {
      load_vec<VEC>(grow + j0, c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) c[e] = j0 + e < k ? c[e] : acc_t(0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) c[e] = acc_t(0);
    }
    if (need_w) {
      acc_t w[VEC];
      load_vec<VEC>(wrow + j0, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) c[e] += sh * (P == 1 ? sign_of(w[e]) : w[e] * inv_n);
    }
    if (pos_grad != nullptr) {
      store_vec<VEC>(dst + j0, c);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (c[e] != acc_t(0)) atomicAdd(dst + j0 + e, c[e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel B: deterministic segment reduction of per-position rows into grad_weight
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads) segment_reduce_rows_kernel(
    const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
    const at::opmath_type<scalar_t>* __restrict__ pos_grad, scalar_t* __restrict__ grad_weight, int64_t R, int64_t N,
    int64_t D, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (i >= R) return;  // no shuffles in this kernel
  const int64_t row = sorted_rows[i];
  if (i > 0 && sorted_rows[i - 1] == row) return;  // not the head of a run
  if (row < 0 || row >= N) return;
  const int64_t end = run_end(sorted_rows, i, R, row);
  const int64_t units = D / VEC;
  scalar_t* grow = grad_weight + row * D;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t sum[VEC];
    run_partial_sum<acc_t, VEC>(order, pos_grad, i, end, D, j0, sum);  // chunk partials, ascending
#pragma unroll
    for (int e = 0; e < VEC; ++e) grow[j0 + e] = static_cast<scalar_t>(sum[e]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Fused update kernel: kernel B's run sum applied as an optimizer step to the table row (and its state) in place
// ---------------------------------------------------------------------------------------------------------
struct UpdateHyper {
  int opt;  // 0 sgd, 1 adagrad, 2 adam (RowOptimizer order)
  double lr, eps, beta1, beta2, wd, step_size, inv_sqrt_bc2;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads) segment_update_rows_kernel(
    const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
    const at::opmath_type<scalar_t>* __restrict__ pos_grad, scalar_t* __restrict__ weight,
    at::opmath_type<scalar_t>* __restrict__ state1, at::opmath_type<scalar_t>* __restrict__ state2,
    UpdateHyper hp, const LazyDecay lazy, int64_t R, int64_t N, int64_t D, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  // Every lane reaches the shuffles (lazy decay, row-wise Adagrad): no early return before them.
  int64_t row = -1, end = 0;
  if (i < R) {
    row = sorted_rows[i];
    const bool head = (i == 0 || sorted_rows[i - 1] != row) && row < N;
    if (head) {
      end = run_end(sorted_rows, i, R, row);
    } else {
      row = -1;
    }
  }
  const int64_t units = D / VEC;
  const acc_t wd = static_cast<acc_t>(hp.wd), lr = static_cast<acc_t>(hp.lr), eps = static_cast<acc_t>(hp.eps);
  scalar_t* wrow = weight + (row >= 0 ? row : 0) * D;
  // Lazy weight decay: catch the row up on the steps it skipped before its update reads it (lazy_decay.cuh).
  if (lazy.last != nullptr) {
    const int64_t k = catch_up_steps(lazy, row >= 0, row >= 0 ? row : 0, lane, G);
    if (hp.opt == 1) {
      catch_up_adagrad<VEC>(lazy, k, wrow, state1, row, D, units, lane, G);
    } else if (k > 0 && hp.opt == 2) {
      catch_up_units<true, VEC>(lazy, k, wrow, state1 + row * D, state2 + row * D, units, lane, G);
    } else if (k > 0) {
      catch_up_units<false, VEC>(lazy, k, wrow, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), units,
                                 lane, G);
    }
  }
  acc_t mult = lr;
  if (hp.opt == 1) {  // row-wise Adagrad: state1[row] += mean(g^2) over the full row
    acc_t sq = acc_t(0);
    if (row >= 0) {
      for (int64_t u = lane; u < units; u += G) {
        const int64_t j0 = u * VEC;
        acc_t g[VEC], w[VEC];
        run_partial_sum<acc_t, VEC>(order, pos_grad, i, end, D, j0, g);
        load_vec<VEC>(wrow + j0, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[e] += wd * w[e];
          sq += g[e] * g[e];
        }
      }
    }
    sq = group_sum(sq, G);
    // state1[row] is read and written by lane 0 only; the other lanes get the multiplier by shuffle.
    if (row >= 0 && lane == 0) {
      const acc_t acc = state1[row] + sq / static_cast<acc_t>(D);
      mult = lr / (acc_sqrt(acc) + eps);
      state1[row] = acc;
    }
    mult = __shfl_sync(0xffffffffu, mult, 0, G);
  }
  if (row < 0) return;
  const acc_t beta1 = static_cast<acc_t>(hp.beta1), beta2 = static_cast<acc_t>(hp.beta2);
  const acc_t step_size = static_cast<acc_t>(hp.step_size), inv_sqrt_bc2 = static_cast<acc_t>(hp.inv_sqrt_bc2);
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t g[VEC], w[VEC];
    run_partial_sum<acc_t, VEC>(order, pos_grad, i, end, D, j0, g);
    load_vec<VEC>(wrow + j0, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] += wd * w[e];
    if (hp.opt == 2) {
      acc_t* m = state1 + row * D + j0;
      acc_t* v = state2 + row * D + j0;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t mj = beta1 * m[e] + (acc_t(1) - beta1) * g[e];
        const acc_t vj = beta2 * v[e] + (acc_t(1) - beta2) * g[e] * g[e];
        m[e] = mj;
        v[e] = vj;
        w[e] -= step_size * mj / (acc_sqrt(vj) * inv_sqrt_bc2 + eps);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) w[e] -= mult * g[e];
    }
    store_vec<VEC>(wrow + j0, w);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel C: OOV gradient partial sums, one thread per (field, column, batch chunk)
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void masked_embedding_oov_grad_kernel(const scalar_t* __restrict__ grad_out,
                                                 const at::opmath_type<scalar_t>* __restrict__ norm,
                                                 const at::opmath_type<scalar_t>* __restrict__ threshold,
                                                 const int64_t* __restrict__ dims, int64_t dims_stride_b,
                                                 at::opmath_type<scalar_t>* __restrict__ partial,  // (chunks, F, D)
                                                 int64_t B, int64_t F, int64_t D, int64_t chunk, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  for (int64_t c = blockIdx.z; c < chunks; c += gridDim.z) {
    const int64_t b0 = c * chunk;
    const int64_t b1 = b0 + chunk < B ? b0 + chunk : B;
    for (int64_t f = blockIdx.y; f < F; f += gridDim.y) {
      const acc_t t = threshold[f];
      acc_t acc = acc_t(0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t pos = b * F + f;
        const acc_t x = norm[pos] - t;
        if (x > acc_t(0)) continue;  // kept row: no gradient to the OOV vector
        if (dims != nullptr) {
          const int64_t k = dims[b * dims_stride_b + f];
          if (j >= k) continue;
        }
        acc += x != x ? x : static_cast<acc_t>(grad_out[pos * D + j]);  // 1 - m = NaN for a NaN x
      }
      partial[(c * F + f) * D + j] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------
struct Shapes {
  int64_t B, F, N, D;
};

Shapes check_inputs(const at::Tensor& weight, const at::Tensor& indices, const std::optional<at::Tensor>& threshold,
                    const std::optional<at::Tensor>& dims, int64_t p, const std::optional<at::Tensor>& oov_weight) {
  TORCH_CHECK(weight.is_cuda(), "masked_embedding: weight must be a CUDA tensor, got ", weight.device());
  OPTEMBED_CHECK_DIM(weight, "masked_embedding: weight", 2);
  OPTEMBED_CHECK_FLOAT_DTYPE(weight, "masked_embedding: weight");
  OPTEMBED_CHECK_DIM(indices, "masked_embedding: indices", 2);
  OPTEMBED_CHECK_INDEX_DTYPE(indices, "masked_embedding: indices");
  OPTEMBED_CHECK_SAME_DEVICE(indices, weight, "masked_embedding: indices", "weight");
  TORCH_CHECK_VALUE(p == 1 || p == 2, "masked_embedding: p must be 1 or 2, got ", p);
  const int64_t B = indices.size(0), F = indices.size(1), N = weight.size(0), D = weight.size(1);
  if (threshold.has_value()) {
    const at::Tensor& t = *threshold;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == F, "masked_embedding: threshold must have shape (F,) = (", F,
                ",), got ", t.sizes());
    OPTEMBED_CHECK_FLOAT_DTYPE(t, "masked_embedding: threshold");
    OPTEMBED_CHECK_SAME_DEVICE(t, weight, "masked_embedding: threshold", "weight");
  }
  if (dims.has_value()) {
    const at::Tensor& d = *dims;
    OPTEMBED_CHECK_INDEX_DTYPE(d, "masked_embedding: dims");
    TORCH_CHECK((d.dim() == 1 && d.size(0) == F) || (d.dim() == 2 && d.size(0) == B && d.size(1) == F),
                "masked_embedding: dims must have shape (F,) = (", F, ",) or (B, F) = (", B, ", ", F, "), got ",
                d.sizes());
    OPTEMBED_CHECK_SAME_DEVICE(d, weight, "masked_embedding: dims", "weight");
  }
  if (oov_weight.has_value()) {
    const at::Tensor& o = *oov_weight;
    TORCH_CHECK(o.dim() == 2 && o.size(0) == F && o.size(1) == D, "masked_embedding: oov_weight must have shape (F, D) = (",
                F, ", ", D, "), got ", o.sizes());
    TORCH_CHECK(o.scalar_type() == weight.scalar_type(), "masked_embedding: oov_weight dtype ", o.scalar_type(),
                " must match weight dtype ", weight.scalar_type());
    OPTEMBED_CHECK_SAME_DEVICE(o, weight, "masked_embedding: oov_weight", "weight");
  }
  return {B, F, N, D};
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> masked_embedding_forward_cuda(const at::Tensor& weight, const at::Tensor& indices,
                                                                 const std::optional<at::Tensor>& threshold,
                                                                 const std::optional<at::Tensor>& dims, int64_t p,
                                                                 const std::optional<at::Tensor>& oov_weight,
                                                                 bool check_indices) {
  const Shapes s = check_inputs(weight, indices, threshold, dims, p, oov_weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::ScalarType acc_type = acc_type_of(weight.scalar_type());
  at::Tensor out = at::empty({s.B, s.F, s.D}, weight.options());
  at::Tensor norm = at::empty({s.B, s.F}, weight.options().dtype(acc_type));
  const int64_t R = s.B * s.F;
  if (R == 0) return {out, norm};

  const at::Tensor w = weight.contiguous();
  const at::Tensor idx = indices.contiguous();  // int32 or int64: the kernels are templated on the index type
  const at::Tensor thr = threshold.has_value() ? threshold->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dm = dims.has_value() ? dims->to(at::kLong).contiguous() : at::Tensor();
  const int64_t dims_stride_b = (dims.has_value() && dims->dim() == 2) ? s.F : 0;
  const at::Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : at::Tensor();
  at::Tensor errors = check_indices ? make_error_slots(3, weight) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(weight.scalar_type(), "masked_embedding_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = s.D % kVec == 0 && aligned16(w.data_ptr()) && aligned16(out.data_ptr()) &&
                        (!oov.defined() || aligned16(oov.data_ptr()));
    OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "masked_embedding: indices", [&] {
    OPTEMBED_P_SWITCH(p, kP, [&] {
      OPTEMBED_BOOL_SWITCH(dims.has_value(), kHasDims, [&] {
        OPTEMBED_BOOL_SWITCH(oov_weight.has_value(), kHasOov, [&] {
          OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
            constexpr int V = kVecOk ? kVec : 1;
            const GroupLaunch L = group_launch(R, s.D, V, "masked_embedding");
            masked_embedding_forward_kernel<scalar_t, index_t, kP, kHasDims, kHasOov, V>
                <<<L.blocks, kBlockThreads, 0, stream>>>(
                    w.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), thr.defined() ? thr.data_ptr<acc_t>() : nullptr,
                    dm.defined() ? dm.data_ptr<int64_t>() : nullptr, dims_stride_b,
                    oov.defined() ? oov.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                    norm.data_ptr<acc_t>(), errors.defined() ? errors.data_ptr<int64_t>() : nullptr, R, s.F, s.N, s.D, L.G);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
    });
  });

  if (check_indices) {  // same order and messages as the CPU kernel
    const std::vector<int64_t> err = read_error_slots(errors);
    TORCH_CHECK_VALUE(err[kErrThreshold] == kNoError, "masked_embedding_forward: threshold[", err[kErrThreshold],
                      "] is NaN");
    if (err[kErrIndex] != kNoError) {
      const int64_t pos = err[kErrIndex];
      TORCH_CHECK_INDEX(false, "indices[", pos / s.F, ", ", pos % s.F, "] = ",
                        idx.view({R}).select(0, pos).to(at::kLong).item<int64_t>(), " is out of range for weight with N = ", s.N,
                        " rows (valid ids are 0 <= id < N)");
    }
    if (err[kErrDims] != kNoError) {
      const int64_t pos = err[kErrDims];
      if (dims_stride_b == 0) {
        TORCH_CHECK_VALUE(false, "dims[", pos % s.F, "] = ", dm.select(0, pos % s.F).item<int64_t>(),
                          " must lie in [0, D = ", s.D, "]");
      }
      TORCH_CHECK_VALUE(false, "dims[", pos / s.F, ", ", pos % s.F, "] = ",
                        dm.view({R}).select(0, pos).item<int64_t>(), " must lie in [0, D = ", s.D, "]");
    }
  }
  return {out, norm};
}

// Kernel A for both backwards (the plain one and the one with the update fused in): dispatch on the index type,
// p, dims / oov presence and the vector width, then one launch. pos_grad (R, D) or atomic_grad (N, D) receives the
// rows (the other undefined); pos_tgrad (R,) the STE scalars when there is a threshold.
template <typename scalar_t>
void launch_backward_rows(const Shapes& s, int64_t p, const at::Tensor& g, const at::Tensor& w, const at::Tensor& idx,
                          const at::Tensor& nrm, const at::Tensor& thr, const at::Tensor& dm, int64_t dims_stride_b,
                          const at::Tensor& oov, const at::Tensor& pos_grad, const at::Tensor& atomic_grad,
                          const at::Tensor& pos_tgrad, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = s.B * s.F;
  constexpr int kVec = vec_width<scalar_t>();
  const bool vec_ok = s.D % kVec == 0 && aligned16(w.data_ptr()) && aligned16(g.data_ptr()) &&
                      (!oov.defined() || aligned16(oov.data_ptr()));
  OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "masked_embedding: indices", [&] {
    OPTEMBED_P_SWITCH(p, kP, [&] {
      OPTEMBED_BOOL_SWITCH(dm.defined(), kHasDims, [&] {
        OPTEMBED_BOOL_SWITCH(oov.defined(), kHasOov, [&] {
          OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
            constexpr int V = kVecOk ? kVec : 1;
            const GroupLaunch L = group_launch(R, s.D, V, "masked_embedding");
            masked_embedding_backward_rows_kernel<scalar_t, index_t, kP, kHasDims, kHasOov, V>
                <<<L.blocks, kBlockThreads, 0, stream>>>(
                    g.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), nrm.data_ptr<acc_t>(),
                    thr.defined() ? thr.data_ptr<acc_t>() : nullptr, dm.defined() ? dm.data_ptr<int64_t>() : nullptr,
                    dims_stride_b, oov.defined() ? oov.data_ptr<scalar_t>() : nullptr,
                    pos_grad.defined() ? pos_grad.data_ptr<acc_t>() : nullptr,
                    atomic_grad.defined() ? atomic_grad.data_ptr<acc_t>() : nullptr,
                    pos_tgrad.defined() ? pos_tgrad.data_ptr<acc_t>() : nullptr, R, s.F, s.N, s.D, L.G);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
}

// Kernel C for both backwards: per-(field, column, batch chunk) partial sums, then their sum into grad_oov.
template <typename scalar_t>
void launch_oov_grad(const Shapes& s, const at::Tensor& g, const at::Tensor& nrm, const at::Tensor& thr,
                     const at::Tensor& dm, int64_t dims_stride_b, at::Tensor& grad_oov, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int threads = static_cast<int>(std::min<int64_t>(kBlockThreads, ceil_div(s.D, 32) * 32));
  const int64_t chunk = std::max<int64_t>(32, ceil_div(s.B, 4096));
  const int64_t chunks = ceil_div(s.B, chunk);
  at::Tensor partial = at::empty({chunks, s.F, s.D}, nrm.options());
  TORCH_CHECK(ceil_div(s.D, threads) <= std::numeric_limits<int>::max(), "masked_embedding: D too large");
  const dim3 grid(static_cast<unsigned>(ceil_div(s.D, threads)), static_cast<unsigned>(std::min<int64_t>(s.F, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
  masked_embedding_oov_grad_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      g.data_ptr<scalar_t>(), nrm.data_ptr<acc_t>(), thr.data_ptr<acc_t>(),
      dm.defined() ? dm.data_ptr<int64_t>() : nullptr, dims_stride_b, partial.data_ptr<acc_t>(), s.B, s.F, s.D, chunk,
      chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_oov.copy_(partial.sum(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_embedding_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& norm,
    const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& dims, int64_t p,
    const std::optional<at::Tensor>& oov_weight, bool deterministic, bool sparse) {
  const Shapes s = check_inputs(weight, indices, threshold, dims, p, oov_weight);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.B && grad_out.size(1) == s.F && grad_out.size(2) == s.D,
              "masked_embedding: grad_out must have shape (B, F, D) = (", s.B, ", ", s.F, ", ", s.D, "), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), "masked_embedding: grad_out dtype ",
              grad_out.scalar_type(), " must match weight dtype ", weight.scalar_type());
  OPTEMBED_CHECK_SAME_DEVICE(grad_out, weight, "masked_embedding: grad_out", "weight");
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == s.B && norm.size(1) == s.F,
              "masked_embedding: norm must have shape (B, F) = (", s.B, ", ", s.F, "), got ", norm.sizes());
  OPTEMBED_CHECK_SAME_DEVICE(norm, weight, "masked_embedding: norm", "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::ScalarType acc_type = acc_type_of(weight.scalar_type());
  const int64_t R = s.B * s.F;

  at::Tensor grad_threshold =
      threshold.has_value() ? at::zeros({s.F}, threshold->options()) : at::zeros({0}, weight.options());
  at::Tensor grad_oov = oov_weight.has_value() ? at::zeros({s.F, s.D}, oov_weight->options())
                                               : at::zeros({0}, weight.options());
  if (R == 0 || s.D == 0) {
    return {at::zeros({sparse ? R : s.N, s.D}, weight.options()), grad_threshold, grad_oov};
  }

  const at::Tensor g = grad_out.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor idx = indices.contiguous();  // int32 or int64: the kernels are templated on the index type
  const at::Tensor nrm = norm.to(acc_type).contiguous();
  const at::Tensor thr = threshold.has_value() ? threshold->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dm = dims.has_value() ? dims->to(at::kLong).contiguous() : at::Tensor();
  const int64_t dims_stride_b = (dims.has_value() && dims->dim() == 2) ? s.F : 0;
  const at::Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : at::Tensor();
  const bool reduced = acc_type != weight.scalar_type();
  // float16 / bfloat16 dense gradients take the sort-based path: an atomic accumulator would be a full (N, D)
  // float32 copy of the table on every step.
  const bool sorted_dense = !sparse && (deterministic || reduced);
  const bool per_position = sparse || sorted_dense;
  // Per-position rows (R, D) in acc_t, or the dense (N, D) atomic accumulator in acc_t (grad_weight itself for
  // float32 / float64 weights).
  at::Tensor pos_grad = per_position ? at::empty({R, s.D}, weight.options().dtype(acc_type)) : at::Tensor();
  at::Tensor atomic_grad = per_position ? at::Tensor() : at::zeros({s.N, s.D}, weight.options().dtype(acc_type));
  // Deterministic dense: rows not touched stay zero, touched rows are written once by kernel B.
  at::Tensor grad_weight = sorted_dense ? at::zeros({s.N, s.D}, weight.options()) : at::Tensor();
  at::Tensor pos_tgrad = threshold.has_value() ? at::empty({R}, weight.options().dtype(acc_type)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(weight.scalar_type(), "masked_embedding_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_backward_rows<scalar_t>(s, p, g, w, idx, nrm, thr, dm, dims_stride_b, oov, pos_grad, atomic_grad,
                                   pos_tgrad, stream);

    if (sorted_dense) {
      // Stable sort by row (equal rows keep ascending position order), hot runs split into chunks, then one
      // group per run head writes the row once.
      const auto sorted = sort_rows(idx.view({R}), s.N, stream);
      const at::Tensor& sorted_rows = std::get<0>(sorted);
      const at::Tensor& order = std::get<1>(sorted);
      constexpr int kAccVec = vec_width<acc_t>();
      const bool acc_vec_ok = s.D % kAccVec == 0;  // pos_grad is a fresh allocation: rows are 16-byte aligned
      OPTEMBED_BOOL_SWITCH(acc_vec_ok, kVecOk, [&] {
        constexpr int V = kVecOk ? kAccVec : 1;
        const GroupLaunch L = group_launch(R, s.D, V, "masked_embedding");
        chunk_partial_kernel<acc_t, V><<<L.blocks, kBlockThreads, 0, stream>>>(
            sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pos_grad.data_ptr<acc_t>(), R, s.N, s.D, L.G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        segment_reduce_rows_kernel<scalar_t, V><<<L.blocks, kBlockThreads, 0, stream>>>(
            sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pos_grad.data_ptr<acc_t>(),
            grad_weight.data_ptr<scalar_t>(), R, s.N, s.D, L.G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }

    if (oov_weight.has_value() && threshold.has_value()) {
      // Without a threshold every row is kept and grad_oov stays zero.
      launch_oov_grad<scalar_t>(s, g, nrm, thr, dm, dims_stride_b, grad_oov, stream);
    }
  });

  if (sparse) {
    grad_weight = reduced ? pos_grad.to(weight.scalar_type()) : pos_grad;
  } else if (!sorted_dense) {
    grad_weight = reduced ? atomic_grad.to(weight.scalar_type()) : atomic_grad;
  }
  if (threshold.has_value()) grad_threshold.copy_(pos_tgrad.view({s.B, s.F}).sum(0));
  return {grad_weight, grad_threshold, grad_oov};
}

// Backward with the optimizer step fused in (schema in csrc/masked_embedding.cpp): kernel A's per-position rows,
// the row sort and hot-run split of the deterministic path, then one group per run head sums the run in ascending
// position order and updates weight[row] (and its state) in place. On the GPU the per-position rows are still
// written once to a scratch buffer (in acc_t); no (N, D) gradient and no separate optimizer pass exist.
std::tuple<at::Tensor, at::Tensor> masked_embedding_backward_update_cuda(
    const at::Tensor& grad_out, at::Tensor weight, const at::Tensor& indices, const at::Tensor& norm,
    const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& dims, int64_t p,
    const std::optional<at::Tensor>& oov_weight, std::optional<at::Tensor> state1, std::optional<at::Tensor> state2,
    c10::string_view optimizer_sv, double lr, double eps, double beta1, double beta2, double weight_decay,
    int64_t step, std::optional<at::Tensor> last_step) {
  const Shapes s = check_inputs(weight, indices, threshold, dims, p, oov_weight);
  TORCH_CHECK(weight.is_contiguous(), "masked_embedding_backward_update: weight must be contiguous (updated in place)");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.B && grad_out.size(1) == s.F && grad_out.size(2) == s.D,
              "masked_embedding: grad_out must have shape (B, F, D) = (", s.B, ", ", s.F, ", ", s.D, "), got ",
              grad_out.sizes());
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == s.B && norm.size(1) == s.F,
              "masked_embedding: norm must have shape (B, F) = (", s.B, ", ", s.F, "), got ", norm.sizes());
  const std::string optimizer(optimizer_sv.data(), optimizer_sv.size());
  const at::Tensor g = grad_out.contiguous();
  sparse_row_update_check(weight, indices.reshape({-1}), g.view({-1, s.D}), state1, state2, optimizer, lr, eps, beta1,
                          beta2, weight_decay, step);
  check_last_step(last_step, weight, step, "masked_embedding_backward_update");
  const LazyDecay lazy = LazyDecay::make(
      (last_step.has_value() && last_step->defined()) ? last_step->mutable_data_ptr<int64_t>() : nullptr, step, lr,
      weight_decay, beta1, beta2, eps);
  const RowOptimizer opt = parse_optimizer(optimizer);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::ScalarType acc_type = acc_type_of(weight.scalar_type());
  const int64_t R = s.B * s.F;
  at::Tensor grad_threshold =
      threshold.has_value() ? at::zeros({s.F}, threshold->options()) : at::zeros({0}, weight.options());
  at::Tensor grad_oov = oov_weight.has_value() ? at::zeros({s.F, s.D}, oov_weight->options())
                                               : at::zeros({0}, weight.options());
  if (R == 0 || s.D == 0) return {grad_threshold, grad_oov};

  const at::Tensor idx = indices.contiguous();  // int32 or int64: the kernels are templated on the index type
  const at::Tensor nrm = norm.to(acc_type).contiguous();
  const at::Tensor thr = threshold.has_value() ? threshold->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dm = dims.has_value() ? dims->to(at::kLong).contiguous() : at::Tensor();
  const int64_t dims_stride_b = (dims.has_value() && dims->dim() == 2) ? s.F : 0;
  const at::Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : at::Tensor();
  at::Tensor pos_grad = at::empty({R, s.D}, weight.options().dtype(acc_type));
  at::Tensor pos_tgrad = threshold.has_value() ? at::empty({R}, weight.options().dtype(acc_type)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  UpdateHyper hp{static_cast<int>(opt), lr, eps, beta1, beta2, weight_decay, lr, 1.0};
  if (opt == RowOptimizer::kAdam) {
    hp.step_size = lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
    hp.inv_sqrt_bc2 = 1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  }

  OPTEMBED_DISPATCH_FLOATING(weight.scalar_type(), "masked_embedding_backward_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_backward_rows<scalar_t>(s, p, g, weight, idx, nrm, thr, dm, dims_stride_b, oov, pos_grad, at::Tensor(),
                                   pos_tgrad, stream);
    // grad_oov reads only grad_out and the norms: computed before the rows change (stream order anyway)
    if (oov_weight.has_value() && threshold.has_value()) {
      launch_oov_grad<scalar_t>(s, g, nrm, thr, dm, dims_stride_b, grad_oov, stream);
    }
    const auto sorted = sort_rows(idx.view({R}), s.N, stream);
    const at::Tensor& sorted_rows = std::get<0>(sorted);
    const at::Tensor& order = std::get<1>(sorted);
    constexpr int kAccVec = vec_width<acc_t>();
    const bool upd_vec_ok = s.D % kAccVec == 0 && aligned_to(weight.data_ptr(), sizeof(scalar_t) * kAccVec);
    acc_t* s1 = (state1.has_value() && state1->defined()) ? state1->data_ptr<acc_t>() : nullptr;
    acc_t* s2 = (state2.has_value() && state2->defined()) ? state2->data_ptr<acc_t>() : nullptr;
    OPTEMBED_BOOL_SWITCH(upd_vec_ok, kVecOk, [&] {
      constexpr int V = kVecOk ? kAccVec : 1;
      const GroupLaunch L = group_launch(R, s.D, V, "masked_embedding");
      chunk_partial_kernel<acc_t, V><<<L.blocks, kBlockThreads, 0, stream>>>(
          sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pos_grad.data_ptr<acc_t>(), R, s.N, s.D, L.G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      segment_update_rows_kernel<scalar_t, V><<<L.blocks, kBlockThreads, 0, stream>>>(
          sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pos_grad.data_ptr<acc_t>(),
          weight.data_ptr<scalar_t>(), s1, s2, hp, lazy, R, s.N, s.D, L.G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (threshold.has_value()) grad_threshold.copy_(pos_tgrad.view({s.B, s.F}).sum(0));
  return {grad_threshold, grad_oov};
}

}  // namespace
}  // namespace cuda
}  // namespace optembed

TORCH_LIBRARY_IMPL(optembed, CUDA, m) {
  m.impl("masked_embedding_forward", &optembed::cuda::masked_embedding_forward_cuda);
  m.impl("masked_embedding_backward", &optembed::cuda::masked_embedding_backward_cuda);
  m.impl("masked_embedding_backward_update", &optembed::cuda::masked_embedding_backward_update_cuda);
}
