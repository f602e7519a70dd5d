// Row sort and hot-row split shared by the CUDA kernels that reduce per-position gradient rows per table row
// (masked_embedding's deterministic / fused-update backward).
//
// sort_rows: stable radix sort of the positions 0..R-1 by row (cub::DeviceRadixSort::SortPairs) over only the key
// bits that rows in [0, N] need (ceil(log2(N + 1)), not 64); ids outside [0, N) are first mapped to N, so they form
// one trailing run that every consumer skips (and can never split a valid row's run).
//
// Hot rows: a run of equal rows is cut into chunks at every multiple of kRowChunk sorted slots. Pass 1
// (chunk_partial_kernel, one group per chunk start) sums the chunk's rows in ascending position order into the
// chunk's first row, in place; pass 2 (the consumer, one group per run head) adds the run's chunk partials in
// ascending order (run_partial_sum). A run of L lookups costs L / kRowChunk serial steps instead of L, and the
// order of every addition is fixed: the result is deterministic.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <cub/device/device_radix_sort.cuh>

#include <tuple>

#include "common.cuh"

namespace optembed {
namespace cuda {

constexpr int64_t kRowChunk = 32;

// keys[i] = ids[i] (N for an id outside [0, N)), pos[i] = i: the sort's input, read from int32 or int64 ids as they
// are (no int64 copy of the ids first).
template <typename index_t>
__global__ void row_keys_kernel(const index_t* __restrict__ ids, int64_t R, int64_t N, int64_t* __restrict__ keys,
                                int64_t* __restrict__ pos) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R) return;
  const int64_t r = static_cast<int64_t>(ids[i]);
  keys[i] = (r < 0 || r >= N) ? N : r;
  pos[i] = i;
}

// (sorted_rows, order): keys in [0, N] (N = an out-of-range id) and the positions, both int64 (R,). flat_ids: int32
// or int64, any layout.
inline std::tuple<at::Tensor, at::Tensor> sort_rows(const at::Tensor& flat_ids, int64_t N, cudaStream_t stream) {
  const int64_t R = flat_ids.numel();
  const at::Tensor ids = flat_ids.contiguous();
  const at::Tensor keys_in = at::empty({R}, ids.options().dtype(at::kLong));
  const at::Tensor pos_in = at::empty({R}, ids.options().dtype(at::kLong));
  if (R > 0) {
    OPTEMBED_DISPATCH_INDEX(ids.scalar_type(), "sort_rows: ids", [&] {
      row_keys_kernel<index_t><<<static_cast<unsigned>(ceil_div(R, kBlockThreads)), kBlockThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), R, N, keys_in.mutable_data_ptr<int64_t>(), pos_in.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor keys_out = at::empty_like(keys_in);
  at::Tensor pos_out = at::empty_like(pos_in);
  int end_bit = 1;
  while (end_bit < 63 && (int64_t(1) << end_bit) <= N) ++end_bit;
  TORCH_CHECK(R <= INT32_MAX, "sort_rows: too many lookups for one sort (", R, ")");
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in.data_ptr<int64_t>(),
                                                 keys_out.data_ptr<int64_t>(), pos_in.data_ptr<int64_t>(),
                                                 pos_out.data_ptr<int64_t>(), static_cast<int>(R), 0, end_bit, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in.data_ptr<int64_t>(),
                                                 keys_out.data_ptr<int64_t>(), pos_in.data_ptr<int64_t>(),
                                                 pos_out.data_ptr<int64_t>(), static_cast<int>(R), 0, end_bit, stream));
  return {keys_out, pos_out};
}

// End of the run of `row` that starts at sorted slot i (jumps whole chunks where the run covers them).
__device__ __forceinline__ int64_t run_end(const int64_t* __restrict__ sorted_rows, int64_t i, int64_t R,
                                           int64_t row) {
  int64_t end = i + 1;
  while (end < R && sorted_rows[end] == row) {
    if (end % kRowChunk == 0 && end + kRowChunk <= R && sorted_rows[end + kRowChunk - 1] == row) {
      end += kRowChunk;
    } else {
      ++end;
    }
  }
  return end;
}

// Pass 1: one group per sorted slot; slots that start a chunk (a run head or a multiple of kRowChunk inside a run)
// sum their chunk into the chunk's first row of `rows` (indexed by position through `order`), in place.
template <typename acc_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads) chunk_partial_kernel(const int64_t* __restrict__ sorted_rows,
                                                                      const int64_t* __restrict__ order,
                                                                      acc_t* __restrict__ rows, int64_t R, int64_t N,
                                                                      int64_t D, int G) {
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (i >= R) return;  // no shuffles in this kernel
  const int64_t row = sorted_rows[i];
  if (row >= N) return;
  const bool head = i == 0 || sorted_rows[i - 1] != row;
  if (!head && i % kRowChunk != 0) return;
  int64_t end = i + 1;
  while (end < R && end % kRowChunk != 0 && sorted_rows[end] == row) ++end;
  if (end == i + 1) return;  // a single row is its own partial
  acc_t* dst = rows + order[i] * D;
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t sum[VEC];
    load_vec<VEC>(dst + j0, sum);
    for (int64_t t = i + 1; t < end; ++t) {
      acc_t c[VEC];
      load_vec<VEC>(rows + order[t] * D + j0, c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum[e] += c[e];
    }
    store_vec<VEC>(dst + j0, sum);
  }
}

// Pass 2 helper: the sum over the run [head, end) of the chunk partials at units j0 .. j0 + VEC (ascending).
template <typename acc_t, int VEC>
__device__ __forceinline__ void run_partial_sum(const int64_t* __restrict__ order, const acc_t* __restrict__ rows,
                                                int64_t head, int64_t end, int64_t D, int64_t j0,
                                                acc_t (&sum)[VEC]) {
  load_vec<VEC>(rows + order[head] * D + j0, sum);
  for (int64_t t = (head / kRowChunk + 1) * kRowChunk; t < end; t += kRowChunk) {
    acc_t c[VEC];
    load_vec<VEC>(rows + order[t] * D + j0, c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum[e] += c[e];
  }
}

}  // namespace cuda
}  // namespace optembed
