// row_mask: which table rows survive a learned per-field norm threshold (OptEmbed pruning of the whole table).
//
//   weight (N, D), field_of_row (N,) int32/int64 in [0, F), threshold (F,), p in {1, 2}
//   mask[r] = ||weight[r]||_p - threshold[field_of_row[r]] > 0          -> bool (N,)
//
// CPU: one fused pass, parallel over rows (at::parallel_for); each row is read once, the norm is accumulated in
// float (double for float64 weights), the field id is range-checked in the same pass. No autograd (bool output).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "row_mask.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

namespace optembed {
namespace {

using at::Tensor;

template <typename scalar_t, typename field_t, int P>
void row_mask_kernel(const scalar_t* __restrict__ w, const field_t* __restrict__ field,
                     const at::opmath_type<scalar_t>* __restrict__ thr, int64_t N, int64_t D, int64_t F,
                     bool* __restrict__ mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  std::atomic<int64_t> first_bad{kNoErrorPos};
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t f = static_cast<int64_t>(field[r]);
      if (f < 0 || f >= F) {  // raised after the pass, naming the first bad row whatever the thread count
        record_first_error(first_bad, r);
        mask[r] = false;
        continue;
      }
      mask[r] = row_norm<P, acc_t>(w + r * D, D) - thr[f] > acc_t(0);
    }
  });
  if (const int64_t r = first_bad.load(); r != kNoErrorPos) {
    TORCH_CHECK_INDEX(false, "row_mask: field_of_row[", r, "] = ", static_cast<int64_t>(field[r]),
                      " is out of range for threshold with F = ", F, " fields");
  }
}

}  // namespace

void row_mask_check(const Tensor& weight, const Tensor& field_of_row, const Tensor& threshold, int64_t p) {
  OPTEMBED_CHECK_DIM(weight, "row_mask: weight", 2);
  OPTEMBED_CHECK_FLOAT_DTYPE(weight, "row_mask: weight");
  const int64_t N = weight.size(0);
  TORCH_CHECK(field_of_row.dim() == 1 && field_of_row.size(0) == N,
              "row_mask: field_of_row must have shape (N,) = (", N, ",) matching weight.size(0), got ",
              field_of_row.sizes());
  OPTEMBED_CHECK_INDEX_DTYPE(field_of_row, "row_mask: field_of_row");
  OPTEMBED_CHECK_SAME_DEVICE(field_of_row, weight, "row_mask: field_of_row", "weight");
  TORCH_CHECK(threshold.dim() == 1, "row_mask: threshold must be 1-D (F,), got shape ", threshold.sizes());
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), "row_mask: threshold must be floating point, got ",
              threshold.scalar_type());
  OPTEMBED_CHECK_SAME_DEVICE(threshold, weight, "row_mask: threshold", "weight");
  TORCH_CHECK_VALUE(p == 1 || p == 2, "row_mask: p must be 1 or 2, got ", p);
}

namespace {

Tensor row_mask_cpu(const Tensor& weight, const Tensor& field_of_row, const Tensor& threshold, int64_t p) {
  row_mask_check(weight, field_of_row, threshold, p);
  const int64_t N = weight.size(0), D = weight.size(1);

  Tensor mask = at::empty({N}, weight.options().dtype(at::kBool));
  const at::ScalarType acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor thr = threshold.to(acc).contiguous();
  const int64_t F = thr.numel();
  AT_DISPATCH_FLOATING_TYPES(acc, "row_mask_nan_check", [&] {
    const scalar_t* tp = thr.const_data_ptr<scalar_t>();
    for (int64_t f = 0; f < F; ++f) TORCH_CHECK_VALUE(!std::isnan(tp[f]), "row_mask: threshold[", f, "] is NaN");
  });
  if (N == 0) return mask;
  const Tensor w = weight.contiguous();
  const Tensor fr = field_of_row.contiguous();
  OPTEMBED_DISPATCH_FLOATING(w.scalar_type(), "row_mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    OPTEMBED_DISPATCH_INDEX(fr.scalar_type(), "row_mask: field_of_row", [&] {
      OPTEMBED_P_SWITCH(p, kP, [&] {
        row_mask_kernel<scalar_t, index_t, kP>(w.const_data_ptr<scalar_t>(), fr.const_data_ptr<index_t>(),
                                               thr.const_data_ptr<acc_t>(), N, D, F, mask.mutable_data_ptr<bool>());
      });
    });
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optembed, m) {
  m.def("row_mask(Tensor weight, Tensor field_of_row, Tensor threshold, int p) -> Tensor");
}

TORCH_LIBRARY_IMPL(optembed, CPU, m) {
  m.impl("row_mask", &row_mask_cpu);
}

}  // namespace optembed
