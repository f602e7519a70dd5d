// sparse_row_update (CUDA): fused sparse optimizer step (sgd / row-wise adagrad / lazy adam) on the touched rows
// of an embedding table, in place. Semantics and argument rules: csrc/sparse_row_update.cpp (the argument checks
// are shared with the CPU kernel through sparse_row_update_check).
//
//   1. validation: one thread per position records the first out-of-range index in an error slot; the host reads
//      it (one small synchronising copy) and raises naming `indices` BEFORE anything is updated, as on the CPU.
//   2. stable radix sort of the indices over the bits rows need (sort_rows.cuh): (row, position) pairs ordered by
//      row then position; full chunks of kRowChunk slots inside one run are pre-summed (chunk_sum_kernel), so a hot
//      row's run is not summed by one group alone.
//   3. one group of G lanes per sorted slot (G = power of two covering the row's 16-byte units, at most a warp);
//      the group at the head of each segment (= each distinct row) sums the segment's gradient rows in ascending
//      position order in fp32 (fp64 for float64), adds weight decay, and applies the optimizer to the weight row
//      and its state; every other group idles. A row is read and written exactly once per call, no atomics, so
//      the result is deterministic. Row-wise adagrad reduces sum_j g[j]^2 across the group with warp shuffles and
//      keeps g in registers when a lane owns a single unit of the row (recomputed otherwise).
// Memory traffic: indices and grad_rows read once, each touched weight row (and its state) read and written once;
// O(M * D), never O(N * D).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "common.cuh"
#include "lazy_decay.cuh"
#include "sort_rows.cuh"
#include "sparse_row_update.h"

namespace optembed {

namespace cuda {
namespace {

template <typename index_t>
__global__ void validate_indices_kernel(const index_t* __restrict__ indices, int64_t M, int64_t N,
                                        int64_t* __restrict__ errors) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const int64_t r = static_cast<int64_t>(indices[i]);
  if (r < 0 || r >= N) record_error(errors, i);
}

template <typename A>
struct Hyper {
  A lr, eps, beta1, beta2, wd;
  A step_size;     // adam: lr / (1 - beta1^t)
  A inv_sqrt_bc2;  // adam: 1 / sqrt(1 - beta2^t)
  bool has_wd;
};

// Hot rows: every aligned chunk of kRowChunk sorted slots that lies inside one run (one row) is summed by its own
// group first (chunk_sum_kernel, ascending position) into part[c]. The head of a run then adds, in this fixed
// order, its leading slots up to the first chunk boundary, the full chunks' partials, and the trailing slots:
// a run of L positions costs about L / kRowChunk serial steps instead of L, deterministically.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads) chunk_sum_kernel(const scalar_t* __restrict__ grad,
                                                                  const int64_t* __restrict__ sorted_rows,
                                                                  const int64_t* __restrict__ order,
                                                                  acc_t* __restrict__ part, int64_t M, int64_t D,
                                                                  int G) {
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int64_t s = c * kRowChunk, e = s + kRowChunk;
  if (e > M || sorted_rows[s] != sorted_rows[e - 1]) return;  // not a full chunk inside one run; no shuffles here
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t g[VEC];
    load_vec<VEC>(grad + order[s] * D + j0, g);
    for (int64_t t = s + 1; t < e; ++t) {
      acc_t x[VEC];
      load_vec<VEC>(grad + order[t] * D + j0, x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] += x[k];
    }
    store_vec<VEC>(part + c * D + j0, g);
  }
}

// g = sum over the run [s, e) of grad rows (ascending position, full chunks through part) + wd * w, for the unit
// starting at j0.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void segment_grad(const scalar_t* __restrict__ grad, const int64_t* __restrict__ order,
                                             const acc_t* __restrict__ part, const scalar_t* __restrict__ wrow,
                                             int64_t s, int64_t e, int64_t D, int64_t j0, const Hyper<acc_t>& h,
                                             acc_t (&g)[VEC]) {
  const int64_t c0 = (s + kRowChunk - 1) / kRowChunk;  // first chunk starting at or after s
  const int64_t c1 = e / kRowChunk;                     // chunks [c0, c1) lie fully inside the run
  const int64_t head_end = c0 < c1 ? c0 * kRowChunk : e;
  load_vec<VEC>(grad + order[s] * D + j0, g);
  for (int64_t t = s + 1; t < head_end; ++t) {
    acc_t x[VEC];
    load_vec<VEC>(grad + order[t] * D + j0, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] += x[k];
  }
  if (c0 < c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t x[VEC];
      load_vec<VEC>(part + c * D + j0, x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] += x[k];
    }
    for (int64_t t = c1 * kRowChunk; t < e; ++t) {
      acc_t x[VEC];
      load_vec<VEC>(grad + order[t] * D + j0, x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] += x[k];
    }
  }
  if (h.has_wd) {
    acc_t w[VEC];
    load_vec<VEC>(wrow + j0, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] += h.wd * w[k];
  }
}

template <typename scalar_t, RowOptimizer OPT, int VEC>
__global__ void __launch_bounds__(kBlockThreads) sparse_row_update_kernel(
    scalar_t* __restrict__ weight, const scalar_t* __restrict__ grad, at::opmath_type<scalar_t>* __restrict__ state1,
    at::opmath_type<scalar_t>* __restrict__ state2, const int64_t* __restrict__ sorted_rows,
    const int64_t* __restrict__ order, const at::opmath_type<scalar_t>* __restrict__ part, int64_t M, int64_t N,
    int64_t D, const Hyper<at::opmath_type<scalar_t>> h, const LazyDecay lazy, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  // Out-of-range rows (only with check_indices=False) are never updated: no write outside the table.
  const bool head = i < M && (i == 0 || sorted_rows[i - 1] != sorted_rows[i]) && sorted_rows[i] >= 0 &&
                    sorted_rows[i] < N;
  int64_t r = 0, end = i + 1;
  if (head) {
    r = sorted_rows[i];
    while (end < M && sorted_rows[end] == r) {  // whole chunks at a time where the run covers them
      if (end % kRowChunk == 0 && end + kRowChunk <= M && sorted_rows[end + kRowChunk - 1] == r) {
        end += kRowChunk;
      } else {
        ++end;
      }
    }
  }
  scalar_t* wrow = weight + r * D;
  const int64_t units = D / VEC;
  // Lazy weight decay: catch the row up on the steps it skipped before its update reads it (lazy_decay.cuh).
  if (lazy.last != nullptr) {
    const int64_t k = catch_up_steps(lazy, head, r, lane, G);
    if constexpr (OPT == RowOptimizer::kAdagrad) {
      catch_up_adagrad<VEC>(lazy, k, wrow, state1, r, D, units, lane, G);
    } else if (k > 0) {
      catch_up_units<OPT == RowOptimizer::kAdam, VEC>(lazy, k, wrow, OPT == RowOptimizer::kAdam ? state1 + r * D
                                                                                             : nullptr,
                                                      OPT == RowOptimizer::kAdam ? state2 + r * D : nullptr, units,
                                                      lane, G);
    }
  }

  if constexpr (OPT == RowOptimizer::kAdagrad) {
    // Pass 1: sum_j g[j]^2 over the row (every lane of the warp reaches the shuffles below).
    const bool cached = units <= G;  // each lane owns at most one unit: keep its g in registers
    acc_t gc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) gc[k] = acc_t(0);
    acc_t sq = acc_t(0);
    if (head) {
      for (int64_t u = lane; u < units; u += G) {
        acc_t g[VEC];
        segment_grad<VEC>(grad, order, part, wrow, i, end, D, u * VEC, h, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sq += g[k] * g[k];
          gc[k] = g[k];
        }
      }
    }
    sq = group_sum(sq, G);
    // state1[r] is read and written by lane 0 only; the other lanes get the new value by shuffle.
    acc_t acc = acc_t(0);
    if (head && lane == 0) {
      acc = state1[r] + sq / static_cast<acc_t>(D);
      state1[r] = acc;
    }
    acc = __shfl_sync(0xffffffffu, acc, 0, G);
    if (!head) return;
    const acc_t mult = h.lr / (acc_sqrt(acc) + h.eps);
    for (int64_t u = lane; u < units; u += G) {
      const int64_t j0 = u * VEC;
      acc_t g[VEC], w[VEC];
      if (cached) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) g[k] = gc[k];
      } else {
        segment_grad<VEC>(grad, order, part, wrow, i, end, D, j0, h, g);
      }
      load_vec<VEC>(wrow + j0, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] -= mult * g[k];
      store_vec<VEC>(wrow + j0, w);
    }
  } else {
    if (!head) return;  // no shuffles on this path
    for (int64_t u = lane; u < units; u += G) {
      const int64_t j0 = u * VEC;
      acc_t g[VEC], w[VEC];
      segment_grad<VEC>(grad, order, part, wrow, i, end, D, j0, h, g);
      load_vec<VEC>(wrow + j0, w);
      if constexpr (OPT == RowOptimizer::kSGD) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] -= h.lr * g[k];
      } else {
        acc_t* mrow = state1 + r * D + j0;
        acc_t* vrow = state2 + r * D + j0;
        acc_t m[VEC], v[VEC];
        load_vec<VEC>(mrow, m);
        load_vec<VEC>(vrow, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          m[k] = h.beta1 * m[k] + (acc_t(1) - h.beta1) * g[k];
          v[k] = h.beta2 * v[k] + (acc_t(1) - h.beta2) * g[k] * g[k];
          const acc_t denom = acc_sqrt(v[k]) * h.inv_sqrt_bc2 + h.eps;
          w[k] -= h.step_size * m[k] / denom;
        }
        store_vec<VEC>(mrow, m);
        store_vec<VEC>(vrow, v);
      }
      store_vec<VEC>(wrow + j0, w);
    }
  }
}

void sparse_row_update_cuda(at::Tensor weight, const at::Tensor& indices, const at::Tensor& grad_rows,
                            c10::optional<at::Tensor> state1, c10::optional<at::Tensor> state2,
                            c10::string_view optimizer_sv, double lr, double eps, double beta1, double beta2,
                            double weight_decay, int64_t step, bool check_indices,
                            c10::optional<at::Tensor> last_step) {
  const std::string optimizer(optimizer_sv.data(), optimizer_sv.size());
  sparse_row_update_check(weight, indices, grad_rows, state1, state2, optimizer, lr, eps, beta1, beta2, weight_decay,
                          step);
  check_last_step(last_step, weight, step, "sparse_row_update");
  const LazyDecay lazy = LazyDecay::make(
      (last_step.has_value() && last_step->defined()) ? last_step->mutable_data_ptr<int64_t>() : nullptr, step, lr,
      weight_decay, beta1, beta2, eps);
  const RowOptimizer opt = parse_optimizer(optimizer);
  const int64_t N = weight.size(0), D = weight.size(1), M = indices.size(0);
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = indices.contiguous();  // int32 or int64, read as they are (no int64 copy)

  // 1. validate before touching anything (check_indices=False: out-of-range rows are skipped by the kernel)
  if (check_indices) {
    at::Tensor errors = make_error_slots(1, weight);
    OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "sparse_row_update: indices", [&] {
      validate_indices_kernel<index_t><<<static_cast<unsigned>(ceil_div(M, kBlockThreads)), kBlockThreads, 0, stream>>>(
          idx.const_data_ptr<index_t>(), M, N, errors.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t bad = read_error_slots(errors)[0];
    if (bad != kNoError) {
      const int64_t r = idx.select(0, bad).item<int64_t>();
      TORCH_CHECK_INDEX(false, "sparse_row_update: indices[", bad, "] = ", r, " is out of range [0, ", N,
                        ") for weight with ", N, " rows");
    }
  }

  if (D == 0) return;  // the ids are still checked, nothing to update

  // 2. (row, position) pairs sorted by row, positions ascending within a row (radix sort over the bits rows need;
  //    out-of-range ids, possible only unchecked, become row N and are skipped)
  const auto sorted = sort_rows(idx, N, stream);
  const at::Tensor& sorted_rows = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  const at::Tensor grad = grad_rows.contiguous();

  // 3. one group per sorted slot, the segment heads update their row
  OPTEMBED_DISPATCH_FLOATING(weight.scalar_type(), "sparse_row_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Hyper<acc_t> h{};
    h.lr = static_cast<acc_t>(lr);
    h.eps = static_cast<acc_t>(eps);
    h.beta1 = static_cast<acc_t>(beta1);
    h.beta2 = static_cast<acc_t>(beta2);
    h.wd = static_cast<acc_t>(weight_decay);
    h.has_wd = weight_decay != 0.0;
    h.step_size = h.lr;
    h.inv_sqrt_bc2 = acc_t(1);
    if (opt == RowOptimizer::kAdam) {
      const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
      const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
      h.step_size = static_cast<acc_t>(lr / bc1);
      h.inv_sqrt_bc2 = static_cast<acc_t>(1.0 / std::sqrt(bc2));
    }
    acc_t* s1 = (state1.has_value() && state1->defined()) ? state1->mutable_data_ptr<acc_t>() : nullptr;
    acc_t* s2 = (state2.has_value() && state2->defined()) ? state2->mutable_data_ptr<acc_t>() : nullptr;
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = D % kVec == 0 && aligned16(weight.const_data_ptr()) && aligned16(grad.const_data_ptr()) &&
                        (opt != RowOptimizer::kAdam ||
                         (aligned_to(s1, kVec * sizeof(acc_t)) && aligned_to(s2, kVec * sizeof(acc_t))));
    auto launch = [&](auto opt_tag) {
      constexpr RowOptimizer kOpt = decltype(opt_tag)::value;
      OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
        constexpr int V = kVecOk ? kVec : 1;
        const int64_t chunks = M / kRowChunk;
        at::Tensor part = at::empty({std::max<int64_t>(chunks, 1), D}, weight.options().dtype(
                                        c10::CppTypeToScalarType<acc_t>::value));
        if (chunks > 0) {
          const GroupLaunch C = group_launch(chunks, D, V, "sparse_row_update");
          chunk_sum_kernel<scalar_t, acc_t, V><<<C.blocks, kBlockThreads, 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
              part.mutable_data_ptr<acc_t>(), M, D, C.G);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const GroupLaunch L = group_launch(M, D, V, "sparse_row_update");
        sparse_row_update_kernel<scalar_t, kOpt, V><<<L.blocks, kBlockThreads, 0, stream>>>(
            weight.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), s1, s2,
            sorted_rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), part.const_data_ptr<acc_t>(), M,
            N, D, h, lazy, L.G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    switch (opt) {
      case RowOptimizer::kSGD:
        launch(std::integral_constant<RowOptimizer, RowOptimizer::kSGD>{});
        break;
      case RowOptimizer::kAdagrad:
        launch(std::integral_constant<RowOptimizer, RowOptimizer::kAdagrad>{});
        break;
      case RowOptimizer::kAdam:
        launch(std::integral_constant<RowOptimizer, RowOptimizer::kAdam>{});
        break;
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace optembed

TORCH_LIBRARY_IMPL(optembed, CUDA, m) {
  m.impl("sparse_row_update", &optembed::cuda::sparse_row_update_cuda);
}
