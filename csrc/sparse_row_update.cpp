// sparse_row_update: fused sparse optimizer step on the touched rows of an embedding table (in place).
//
// Schema (TORCH_LIBRARY_FRAGMENT below):
//   sparse_row_update(Tensor(a!) weight, Tensor indices, Tensor grad_rows, Tensor(b!)? state1, Tensor(c!)? state2,
//                     str optimizer, float lr, float eps, float beta1, float beta2, float weight_decay, int step,
//                     bool check_indices=True, Tensor(d!)? last_step=None) -> ()
//
// Arguments
//   weight     (N, D) float32 / float64 / float16 / bfloat16, contiguous; updated in place
//   indices    (M,)   int32 / int64, every entry in [0, N); may repeat, any order. check_indices=True raises
//                     IndexError naming the first entry outside [0, N) before anything is written; with
//                     check_indices=False such entries are skipped (they update nothing)
//   grad_rows  (M, D) same dtype and device as weight: grad_rows[i] is the gradient contribution of position i to
//                     row indices[i] (e.g. the per-position rows of masked_embedding_backward(sparse=True), or the
//                     values of an uncoalesced sparse COO gradient)
//   state1, state2    optimizer state, dtype acc_t = float32 for float32/float16/bfloat16 weights, float64 for
//                     float64 weights; contiguous, same device as weight:
//                       "sgd":     both None
//                       "adagrad": state1 (N,) row-wise sum of mean squared gradients; state2 None
//                       "adam":    state1 (N, D) first moment m, state2 (N, D) second moment v
//   optimizer  "sgd" | "adagrad" (row-wise, as FBGEMM's EXACT_ROWWISE_ADAGRAD) | "adam" (lazy Adam)
//   lr, eps, beta1, beta2, weight_decay: hyper-parameters (eps > 0 for adagrad/adam; 0 <= beta < 1 for adam)
//   step       global optimizer step t >= 1 used by Adam's bias correction (and by lazy weight decay)
//   last_step  None, or (N,) int64 contiguous, updated in place: lazy weight decay. A touched row r with
//              last_step[r] < t - 1 is first caught up on the t - 1 - last_step[r] steps it skipped (the decay
//              gradient weight_decay * w alone, see csrc/row_update.h catch_up_row: exact for sgd, approximate for
//              adagrad / adam), then updated as below; last_step[r] = t for every touched row.
//
// Semantics. Let U = the set of distinct values in indices. For every row r in U (rows not in U are not read or
// written, their state neither), in acc_t arithmetic:
//   g[j]  = sum over positions i with indices[i] == r, in ascending i, of grad_rows[i, j]       (j < D)
//   g[j] += weight_decay * w[r, j]                                                             (L2, if != 0)
//   sgd:      w[r, j] -= lr * g[j]
//   adagrad:  state1[r] += (1/D) * sum_j g[j]^2 ;  w[r, j] -= lr * g[j] / (sqrt(state1[r]) + eps)
//   adam:     m = state1[r, :], v = state2[r, :]
//             m[j] = beta1 * m[j] + (1 - beta1) * g[j] ;  v[j] = beta2 * v[j] + (1 - beta2) * g[j]^2
//             w[r, j] -= (lr / (1 - beta1^t)) * m[j] / (sqrt(v[j]) / sqrt(1 - beta2^t) + eps)
//   (the adam update is torch.optim.Adam's formula restricted to the touched rows: when every row is touched in
//   every step it equals torch.optim.Adam with the same weight_decay; rows not touched keep m, v and w unchanged,
//   i.e. "lazy" Adam as torch.optim.SparseAdam, which however places eps differently).
// The result is deterministic: the per-row sum always runs in ascending position order, independent of the
// number of threads; a row is written exactly once per call.
//
// CPU implementation: (1) a stable LSD radix sort of (row, position) pairs by row over ceil(log2 N) bits
// (11-bit digits, O(M) per pass, also validates the indices), (2) segment boundaries = distinct rows,
// (3) at::parallel_for over distinct rows: sum that row's gradient rows into a thread-local acc_t buffer (a row
// touched once is read directly), apply the update to the weight row and its state. The weight row (and state) a
// few distinct rows ahead and the gradient row a few sorted positions ahead are prefetched. Memory traffic: indices and
// grad_rows are read once, each touched weight row (and its state) is read and written once; O(M*D), never O(N*D).
//
// A CUDA implementation (csrc/cuda/sparse_row_update.cu) must follow the same semantics; the per-row summation
// order (ascending position) should be kept for determinism (sort (row, position) pairs, e.g. with a stable radix
// sort, then one warp/block per distinct row).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "row_update.h"
#include "sparse_row_update.h"

namespace optembed {
namespace {

// Stable LSD radix sort of positions 0..M-1 by key = indices[pos] in [0, N). Returns the sorted positions in
// `order` and the keys in the same order in `keys`. With `check`, raises IndexError on the first out-of-range
// index; without, out-of-range positions are left out (they update nothing: no write outside the table).
template <typename index_t>
void sort_positions_by_row(const index_t* idx, int64_t M, int64_t N, bool check, std::vector<int64_t>& keys,
                           std::vector<int64_t>& order) {
  keys.resize(M);
  order.resize(M);
  int64_t kept = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = static_cast<int64_t>(idx[i]);
    if (r < 0 || r >= N) {
      TORCH_CHECK_INDEX(!check, "sparse_row_update: indices[", i, "] = ", r, " is out of range [0, ", N,
                        ") for weight with ", N, " rows");
      continue;
    }
    keys[kept] = r;
    order[kept] = i;
    ++kept;
  }
  keys.resize(kept);
  order.resize(kept);
  M = kept;
  if (M <= 1) return;
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < N) ++bits;
  constexpr int kDigit = 11;
  constexpr int64_t kBuckets = int64_t(1) << kDigit;
  std::vector<int64_t> keys2(M), order2(M), count(kBuckets);
  for (int shift = 0; shift < bits; shift += kDigit) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < M; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (int64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < M; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys2[dst] = keys[i];
      order2[dst] = order[i];
    }
    keys.swap(keys2);
    order.swap(order2);
  }
}

constexpr int64_t kPrefetchDistance = 8;       // distinct rows ahead
constexpr int64_t kGradPrefetchDistance = 12;  // sorted gradient rows ahead

template <typename scalar_t, RowOptimizer kOpt>
void apply_updates(scalar_t* w, const scalar_t* grad, at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2,
                   const std::vector<int64_t>& keys, const std::vector<int64_t>& order,
                   const std::vector<int64_t>& seg_start, int64_t D, double lr_d, double eps_d, double beta1_d,
                   double beta2_d, double wd_d, int64_t step, int64_t* last) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowUpdateParams<acc_t> hp(kOpt, lr_d, eps_d, beta1_d, beta2_d, wd_d, step);
  const int64_t U = static_cast<int64_t>(seg_start.size()) - 1;
  // Grain: enough rows per task to amortise scheduling, while keeping both cores busy for small M.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gbuf(D), tmp(D);
    acc_t* g = gbuf.data();
    acc_t* t = tmp.data();
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t state_bytes = D * static_cast<int64_t>(sizeof(acc_t));
    // Prefetch: the weight row (and state) of the distinct row kPrefetchDistance segments ahead, and the gradient
    // row kGradPrefetchDistance sorted positions ahead (a hot row's positions are scattered over grad_rows).
    auto prefetch_segment = [&](int64_t u) {
      const int64_t r = keys[seg_start[u]];
      prefetch_row(w + r * D, row_bytes, true);
      if constexpr (kOpt == RowOptimizer::kAdagrad) prefetch_row(s1 + r, 1, true);
      if constexpr (kOpt == RowOptimizer::kAdam) {
        prefetch_row(s1 + r * D, state_bytes, true);
        prefetch_row(s2 + r * D, state_bytes, true);
      }
    };
    const int64_t q_end = seg_start[end];
    auto prefetch_grad = [&](int64_t q) {
      if (q < q_end) prefetch_row(grad + order[q] * D, row_bytes, false);
    };
    for (int64_t u = begin; u < std::min(end, begin + kPrefetchDistance); ++u) prefetch_segment(u);
    for (int64_t q = seg_start[begin]; q < seg_start[begin] + kGradPrefetchDistance; ++q) prefetch_grad(q);
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchDistance < end) prefetch_segment(u + kPrefetchDistance);
      const int64_t s = seg_start[u], e = seg_start[u + 1];
      const int64_t r = keys[s];
      scalar_t* wr = w + r * D;
      {  // g = sum of this row's gradient rows, ascending position
        prefetch_grad(s + kGradPrefetchDistance);
        const scalar_t* g0 = grad + order[s] * D;
        for (int64_t j = 0; j < D; ++j) g[j] = static_cast<acc_t>(g0[j]);
        for (int64_t k = s + 1; k < e; ++k) {
          prefetch_grad(k + kGradPrefetchDistance);
          const scalar_t* gk = grad + order[k] * D;
          for (int64_t j = 0; j < D; ++j) g[j] += static_cast<acc_t>(gk[j]);
        }
      }
      apply_row_update<kOpt>(wr, g, r, D, s1, s2, t, hp, last);
    }
  });
}

void check_state(const c10::optional<at::Tensor>& state, const char* name, const at::Tensor& weight,
                 at::ScalarType acc_type, at::IntArrayRef expected_shape, const char* opt_name) {
  TORCH_CHECK(state.has_value() && state->defined(), "sparse_row_update: optimizer '", opt_name, "' needs ", name,
              " of shape ", expected_shape, ", got None");
  TORCH_CHECK(state->sizes() == expected_shape, "sparse_row_update: ", name, " must have shape ", expected_shape,
              " for optimizer '", opt_name, "', got ", state->sizes());
  TORCH_CHECK(state->scalar_type() == acc_type, "sparse_row_update: ", name, " must be ", acc_type,
              " for a ", weight.scalar_type(), " weight, got ", state->scalar_type());
  TORCH_CHECK(state->device() == weight.device(), "sparse_row_update: ", name, " must be on the same device as weight (",
              weight.device(), "), got ", state->device());
  TORCH_CHECK(state->is_contiguous(), "sparse_row_update: ", name, " must be contiguous");
}

}  // namespace

// Argument checks shared by every backend (also used by the CUDA implementation through the same rules).
void sparse_row_update_check(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad_rows,
                             const c10::optional<at::Tensor>& state1, const c10::optional<at::Tensor>& state2,
                             const std::string& optimizer, double lr, double eps, double beta1, double beta2,
                             double weight_decay, int64_t step) {
  const RowOptimizer opt = parse_optimizer(optimizer);
  OPTEMBED_CHECK_DIM(weight, "sparse_row_update: weight", 2);
  OPTEMBED_CHECK_FLOAT_DTYPE(weight, "sparse_row_update: weight");
  TORCH_CHECK(weight.is_contiguous(), "sparse_row_update: weight must be contiguous (it is updated in place)");
  OPTEMBED_CHECK_DIM(indices, "sparse_row_update: indices", 1);
  OPTEMBED_CHECK_INDEX_DTYPE(indices, "sparse_row_update: indices");
  OPTEMBED_CHECK_SAME_DEVICE(indices, weight, "sparse_row_update: indices", "weight");
  OPTEMBED_CHECK_DIM(grad_rows, "sparse_row_update: grad_rows", 2);
  OPTEMBED_CHECK_SAME_DEVICE(grad_rows, weight, "sparse_row_update: grad_rows", "weight");
  TORCH_CHECK(grad_rows.size(0) == indices.size(0) && grad_rows.size(1) == weight.size(1),
              "sparse_row_update: grad_rows must have shape (M, D) = (", indices.size(0), ", ", weight.size(1),
              "), got ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.scalar_type() == weight.scalar_type(), "sparse_row_update: grad_rows dtype ",
              grad_rows.scalar_type(), " must match weight dtype ", weight.scalar_type());
  TORCH_CHECK(std::isfinite(lr), "sparse_row_update: lr must be finite, got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "sparse_row_update: weight_decay must be >= 0, got ",
              weight_decay);
  const at::ScalarType acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = weight.size(0), D = weight.size(1);
  switch (opt) {
    case RowOptimizer::kSGD:
      TORCH_CHECK(!(state1.has_value() && state1->defined()) && !(state2.has_value() && state2->defined()),
                  "sparse_row_update: optimizer 'sgd' takes no state; state1 and state2 must be None");
      break;
    case RowOptimizer::kAdagrad:
      TORCH_CHECK(eps > 0, "sparse_row_update: eps must be > 0 for 'adagrad', got ", eps);
      check_state(state1, "state1", weight, acc_type, {N}, "adagrad");
      TORCH_CHECK(!(state2.has_value() && state2->defined()),
                  "sparse_row_update: optimizer 'adagrad' takes no state2; it must be None");
      break;
    case RowOptimizer::kAdam:
      TORCH_CHECK(eps > 0, "sparse_row_update: eps must be > 0 for 'adam', got ", eps);
      TORCH_CHECK(beta1 >= 0 && beta1 < 1, "sparse_row_update: beta1 must lie in [0, 1), got ", beta1);
      TORCH_CHECK(beta2 >= 0 && beta2 < 1, "sparse_row_update: beta2 must lie in [0, 1), got ", beta2);
      TORCH_CHECK(step >= 1, "sparse_row_update: step must be >= 1 for 'adam' (bias correction), got ", step);
      check_state(state1, "state1", weight, acc_type, {N, D}, "adam");
      check_state(state2, "state2", weight, acc_type, {N, D}, "adam");
      break;
  }
}

void sparse_row_update_cpu(at::Tensor weight, const at::Tensor& indices, const at::Tensor& grad_rows,
                           c10::optional<at::Tensor> state1, c10::optional<at::Tensor> state2,
                           c10::string_view optimizer_sv, double lr, double eps, double beta1, double beta2,
                           double weight_decay, int64_t step, bool check_indices,
                           c10::optional<at::Tensor> last_step) {
  const std::string optimizer(optimizer_sv.data(), optimizer_sv.size());
  sparse_row_update_check(weight, indices, grad_rows, state1, state2, optimizer, lr, eps, beta1, beta2, weight_decay,
                          step);
  check_last_step(last_step, weight, step, "sparse_row_update");
  int64_t* last = (last_step.has_value() && last_step->defined()) ? last_step->mutable_data_ptr<int64_t>() : nullptr;
  const RowOptimizer opt = parse_optimizer(optimizer);
  const int64_t N = weight.size(0), D = weight.size(1), M = indices.size(0);
  if (M == 0) return;
  const at::Tensor idx = indices.contiguous();
  const at::Tensor grad = grad_rows.contiguous();

  std::vector<int64_t> keys, order;
  OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "sparse_row_update", [&] {
    sort_positions_by_row<index_t>(idx.data_ptr<index_t>(), M, N, check_indices, keys, order);
  });
  const int64_t K = static_cast<int64_t>(keys.size());  // positions with a valid row
  if (K == 0 || D == 0) return;  // D = 0: the ids are still checked, nothing to update
  std::vector<int64_t> seg_start;
  seg_start.reserve(K + 1);
  seg_start.push_back(0);
  for (int64_t i = 1; i < K; ++i) {
    if (keys[i] != keys[i - 1]) seg_start.push_back(i);
  }
  seg_start.push_back(K);

  OPTEMBED_DISPATCH_FLOATING(weight.scalar_type(), "sparse_row_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    acc_t* s1 = (state1.has_value() && state1->defined()) ? state1->data_ptr<acc_t>() : nullptr;
    acc_t* s2 = (state2.has_value() && state2->defined()) ? state2->data_ptr<acc_t>() : nullptr;
    switch (opt) {
      case RowOptimizer::kSGD:
        apply_updates<scalar_t, RowOptimizer::kSGD>(w, g, s1, s2, keys, order, seg_start, D, lr, eps, beta1, beta2,
                                                    weight_decay, step, last);
        break;
      case RowOptimizer::kAdagrad:
        apply_updates<scalar_t, RowOptimizer::kAdagrad>(w, g, s1, s2, keys, order, seg_start, D, lr, eps, beta1,
                                                        beta2, weight_decay, step, last);
        break;
      case RowOptimizer::kAdam:
        apply_updates<scalar_t, RowOptimizer::kAdam>(w, g, s1, s2, keys, order, seg_start, D, lr, eps, beta1, beta2,
                                                     weight_decay, step, last);
        break;
    }
  });
}

}  // namespace optembed

TORCH_LIBRARY_FRAGMENT(optembed, m) {
  // See the semantics at the top of this file.
  m.def(
      "sparse_row_update(Tensor(a!) weight, Tensor indices, Tensor grad_rows, Tensor(b!)? state1, "
      "Tensor(c!)? state2, str optimizer, float lr, float eps, float beta1, float beta2, float weight_decay, "
      "int step, bool check_indices=True, Tensor(d!)? last_step=None) -> ()");
}

TORCH_LIBRARY_IMPL(optembed, CPU, m) {
  m.impl("sparse_row_update", &optembed::sparse_row_update_cpu);
}
