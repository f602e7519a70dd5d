// row_mask (CUDA): which table rows survive a learned per-field norm threshold.
// Semantics: csrc/row_mask.cpp (mask[r] = ||weight[r]||_p - threshold[field_of_row[r]] > 0, bool (N,)).
//
// One kernel. One group of G lanes per table row (G = power of two covering the row's 16-byte units, at most a
// warp): the group reads the row once with 16-byte vector loads (scalar fallback when D is not a multiple of the
// vector width or weight is misaligned), reduces the p-norm with warp shuffles in fp32 (fp64 for float64
// weights), and lane 0 compares it with the threshold of the row's field and writes one bool. Memory: the table
// is streamed once, field_of_row read once, the mask written once.
// Argument checks on the device: an out-of-range field id and a NaN threshold are recorded in error slots
// (smallest failing position) and raised on the host after the launch, naming the argument, as on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"
#include "row_mask.h"

namespace optembed {
namespace cuda {
namespace {

// errors[0]: first row whose field id is out of range; errors[1]: first field whose threshold is NaN.
template <typename scalar_t, typename field_t, int P, int VEC>
__global__ void __launch_bounds__(kBlockThreads) row_mask_kernel(
    const scalar_t* __restrict__ weight, const field_t* __restrict__ field_of_row,
    const at::opmath_type<scalar_t>* __restrict__ threshold, bool* __restrict__ mask, int64_t* __restrict__ errors,
    int64_t N, int64_t D, int64_t F, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < F && threshold[tid] != threshold[tid]) record_error(errors + 1, tid);

  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t r = tid / G;
  const bool active = r < N;
  const int64_t units = D / VEC;

  acc_t acc = acc_t(0);
  if (active) {
    const scalar_t* row = weight + r * D;
    for (int64_t u = lane; u < units; u += G) {
      acc_t w[VEC];
      load_vec<VEC>(row + u * VEC, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += P == 1 ? (w[e] < acc_t(0) ? -w[e] : w[e]) : w[e] * w[e];
    }
  }
  acc = group_sum(acc, G);  // every lane of the warp reaches the shuffle
  if (!active || lane != 0) return;
  const int64_t f = static_cast<int64_t>(field_of_row[r]);
  if (f < 0 || f >= F) {
    record_error(errors, r);
    mask[r] = false;
    return;
  }
  const acc_t norm = P == 1 ? acc : acc_sqrt(acc);
  mask[r] = norm - threshold[f] > acc_t(0);
}

at::Tensor row_mask_cuda(const at::Tensor& weight, const at::Tensor& field_of_row, const at::Tensor& threshold,
                         int64_t p) {
  row_mask_check(weight, field_of_row, threshold, p);
  const int64_t N = weight.size(0), D = weight.size(1);

  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor mask = at::empty({N}, weight.options().dtype(at::kBool));
  const at::ScalarType acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor thr = threshold.to(acc_type).contiguous();
  const int64_t F = thr.numel();
  const int64_t items = N > F ? N : F;  // the kernel also scans the F thresholds for NaN
  if (items == 0) return mask;
  const at::Tensor w = weight.contiguous();
  const at::Tensor fr = field_of_row.contiguous();
  at::Tensor errors = make_error_slots(2, weight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(w.scalar_type(), "row_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = D % kVec == 0 && aligned16(w.const_data_ptr());
    OPTEMBED_DISPATCH_INDEX(fr.scalar_type(), "row_mask: field_of_row", [&] {
      OPTEMBED_P_SWITCH(p, kP, [&] {
        OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
          constexpr int V = kVecOk ? kVec : 1;
          GroupLaunch L = group_launch(N, D, V, "row_mask");
          const int64_t f_blocks = ceil_div(F, kBlockThreads);
          if (f_blocks > static_cast<int64_t>(L.blocks)) L.blocks = static_cast<unsigned>(f_blocks);
          row_mask_kernel<scalar_t, index_t, kP, V><<<L.blocks, kBlockThreads, 0, stream>>>(
              w.const_data_ptr<scalar_t>(), fr.const_data_ptr<index_t>(), thr.const_data_ptr<acc_t>(),
              mask.mutable_data_ptr<bool>(), errors.mutable_data_ptr<int64_t>(), N, D, F, L.G);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });

  const std::vector<int64_t> err = read_error_slots(errors);
  TORCH_CHECK_VALUE(err[1] == kNoError, "row_mask: threshold[", err[1], "] is NaN");
  if (err[0] != kNoError) {
    const int64_t f = fr[err[0]].item<int64_t>();
    TORCH_CHECK_INDEX(false, "row_mask: field_of_row[", err[0], "] = ", f,
                      " is out of range for threshold with F = ", F, " fields");
  }
  return mask;
}

}  // namespace
}  // namespace cuda
}  // namespace optembed

TORCH_LIBRARY_IMPL(optembed, CUDA, m) {
  m.impl("row_mask", &optembed::cuda::row_mask_cuda);
}
