// compact_embedding (CUDA): fused mixed-dimension lookup over per-field compact tables, and its backward.
// Semantics and storage layout: csrc/compact_embedding.cpp (packed / field_offsets / field_dims / remap / oov).
//
// Forward, one kernel. One group of G lanes per lookup (b, f) (G = power of two covering out_dim's 16-byte units,
// at most a warp): the group resolves r = remap[indices[b, f]] and copies the D_f leading values of the field's
// row r (or of oov[f] for a pruned id, or zeros) into out[b, f, :D_f] and zero-pads up to out_dim. 16-byte vector
// loads/stores when every field offset and dimension, out_dim and the base pointers allow them (decided on the
// host from the structural tensors it validates anyway), scalar otherwise. Each output element is written once,
// each kept row read once per lookup. With check_indices the ids and remapped rows are validated on the device
// (the smallest failing lookup is recorded in an error slot and raised on the host, naming `indices` / `remap`);
// invalid lookups never touch memory, whatever check_indices says, and produce zeros.
//
// Backward: every lookup has one destination, the D_f values of its packed row (key = field_offsets[f] + r * D_f)
// or, for a pruned id with oov, the oov row of its field (key = P + f), or none (key = P + F).
//   deterministic=True: stable sort of the per-lookup keys (at::sort, cub radix sort) = (destination, position)
//     pairs ordered by destination then position; one group per sorted slot, the group at the head of each segment
//     sums the segment's grad_out rows in ascending position order (fp32 / fp64) and writes the destination once.
//     No float atomics; untouched entries keep the zeros they were allocated with.
//   deterministic=False: one group per lookup adds its grad_out row into the destination with atomicAdd (into
//     fp32 buffers for float16 / bfloat16, rounded once at the end).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "compact_embedding.h"

namespace optembed {
namespace cuda {
namespace {

// Resolves lookup `pos`: returns the local row r >= -1 of its field, or -2 when the id or the remapped row is
// out of range (recorded in errors[0] when errors != nullptr).
template <typename remap_t>
__device__ __forceinline__ int64_t resolve_row(const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
                                               const remap_t* __restrict__ remap, const int64_t* __restrict__ indices,
                                               int64_t pos, int64_t f, int64_t N, int64_t* errors, bool report) {
  const int64_t id = indices[pos];
  bool ok = id >= 0 && id < N;
  int64_t r = -2;
  if (ok) {
    r = static_cast<int64_t>(remap[id]);
    const int64_t d = dims[f];
    const int64_t rows = d > 0 ? (offs[f + 1] - offs[f]) / d : -1;  // -1: nothing is read, any r >= -1 is fine
    ok = r >= -1 && (rows < 0 || r < rows);
  }
  if (!ok) {
    if (report && errors != nullptr) record_error(errors, pos);
    return -2;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename remap_t, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) compact_embedding_forward_kernel(
    const scalar_t* __restrict__ packed, const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
    const remap_t* __restrict__ remap, const int64_t* __restrict__ indices, const scalar_t* __restrict__ oov,
    scalar_t* __restrict__ out, int64_t* __restrict__ errors, int64_t R, int64_t F, int64_t D, int64_t N, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (pos >= R) return;  // no shuffles in this kernel
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, errors, lane == 0);
  const scalar_t* src = nullptr;
  if (r >= 0) {
    src = packed + offs[f] + r * d;
  } else if (HAS_OOV && r == -1) {
    src = oov + f * D;
  }
  scalar_t* orow = out + pos * D;
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t v[VEC];
    if (src != nullptr && j0 < d) {
      load_vec<VEC>(src + j0, v);  // vector path: d % VEC == 0, so the whole unit lies inside the row
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = j0 + e < d ? v[e] : acc_t(0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = acc_t(0);
    }
    store_vec<VEC>(orow + j0, v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, deterministic: destination keys, then a segment reduction over the stably sorted keys
// ---------------------------------------------------------------------------------------------------------
template <typename remap_t, bool HAS_OOV>
__global__ void compact_embedding_keys_kernel(const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
                                              const remap_t* __restrict__ remap,
                                              const int64_t* __restrict__ indices, int64_t* __restrict__ keys,
                                              int64_t R, int64_t F, int64_t N, int64_t P) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= R) return;
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, nullptr, false);
  int64_t key = P + F;  // no destination
  if (d > 0 && r >= 0) {
    key = offs[f] + r * d;
  } else if (HAS_OOV && d > 0 && r == -1) {
    key = P + f;
  }
  keys[pos] = key;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads) compact_embedding_segment_kernel(
    const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ sorted_keys,
    const int64_t* __restrict__ order, const int64_t* __restrict__ dims, scalar_t* __restrict__ grad_packed,
    scalar_t* __restrict__ grad_oov, int64_t R, int64_t F, int64_t D, int64_t P, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (i >= R) return;  // no shuffles in this kernel
  const int64_t key = sorted_keys[i];
  if (key >= P + F) return;                          // no destination (sorted last)
  if (i > 0 && sorted_keys[i - 1] == key) return;    // not the head of its segment
  int64_t end = i + 1;
  while (end < R && sorted_keys[end] == key) ++end;
  const int64_t f = order[i] % F;  // every lookup of a segment belongs to the same field
  const int64_t d = dims[f];
  scalar_t* dst = key < P ? grad_packed + key : grad_oov + (key - P) * D;
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    if (j0 >= d) break;
    acc_t sum[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum[e] = acc_t(0);
    for (int64_t t = i; t < end; ++t) {  // ascending position order (stable sort)
      acc_t g[VEC];
      load_vec<VEC>(grad_out + order[t] * D + j0, g);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum[e] += g[e];
    }
    if constexpr (VEC == 1) {
      dst[j0] = static_cast<scalar_t>(sum[0]);
    } else {
      store_vec<VEC>(dst + j0, sum);  // vector path: d % VEC == 0
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, fast: atomics into acc_t buffers
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename remap_t, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) compact_embedding_atomic_kernel(
    const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
    const remap_t* __restrict__ remap, const int64_t* __restrict__ indices,
    at::opmath_type<scalar_t>* __restrict__ acc_packed, at::opmath_type<scalar_t>* __restrict__ acc_oov, int64_t R,
    int64_t F, int64_t D, int64_t N, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (pos >= R) return;  // no shuffles in this kernel
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, nullptr, false);
  acc_t* dst = nullptr;
  if (r >= 0) {
    dst = acc_packed + offs[f] + r * d;
  } else if (HAS_OOV && r == -1) {
    dst = acc_oov + f * D;
  }
  if (dst == nullptr) return;
  const scalar_t* grow = grad_out + pos * D;
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    if (j0 >= d) break;
    acc_t g[VEC];
    load_vec<VEC>(grow + j0, g);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (j0 + e < d && g[e] != acc_t(0)) atomicAdd(dst + j0 + e, g[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------
// 16-byte vector accesses are valid when every row start and width is a multiple of the vector width.
bool layout_allows_vec(const CompactLayout& L, int64_t out_dim, int vec) {
  if (vec == 1) return true;
  if (out_dim % vec != 0) return false;
  for (size_t f = 0; f < L.dims.size(); ++f) {
    if (L.offs[f] % vec != 0 || L.dims[f] % vec != 0) return false;
  }
  return true;
}

at::Tensor compact_embedding_forward_cuda(const at::Tensor& packed, const at::Tensor& field_offsets,
                                          const at::Tensor& field_dims, const at::Tensor& remap,
                                          const at::Tensor& indices, int64_t out_dim,
                                          const std::optional<at::Tensor>& oov, bool check_indices) {
  const CompactLayout layout =
      compact_embedding_check_layout(packed, field_offsets, field_dims, remap, indices, out_dim, oov);
  const int64_t B = indices.size(0), F = indices.size(1), D = out_dim, N = remap.numel();
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({B, F, D}, packed.options());
  if (B * F == 0) return out;  // no lookups: nothing to check (out_dim = 0 still checks the ids)
  const int64_t R = B * F;
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor offs_c = field_offsets.contiguous();
  const at::Tensor dims_c = field_dims.contiguous();
  const at::Tensor remap_c = remap.contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor oov_c = oov.has_value() ? oov->contiguous() : at::Tensor();
  at::Tensor errors = check_indices ? make_error_slots(1, packed) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_forward_cuda", [&] {
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = layout_allows_vec(layout, D, kVec) && aligned16(packed_c.const_data_ptr()) &&
                        aligned16(out.const_data_ptr()) &&
                        (!oov_c.defined() || aligned16(oov_c.const_data_ptr()));
    OPTEMBED_DISPATCH_INDEX(remap_c.scalar_type(), "compact_embedding: remap", [&] {
      using remap_t = index_t;
      OPTEMBED_BOOL_SWITCH(oov_c.defined(), kHasOov, [&] {
        OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
          constexpr int V = kVecOk ? kVec : 1;
          const GroupLaunch L = group_launch(R, D, V, "compact_embedding");
          compact_embedding_forward_kernel<scalar_t, remap_t, kHasOov, V><<<L.blocks, kBlockThreads, 0, stream>>>(
              packed_c.const_data_ptr<scalar_t>(), offs_c.const_data_ptr<int64_t>(),
              dims_c.const_data_ptr<int64_t>(), remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<int64_t>(),
              kHasOov ? oov_c.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
              errors.defined() ? errors.mutable_data_ptr<int64_t>() : nullptr, R, F, D, N, L.G);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });

  if (check_indices) {
    const int64_t bad = read_error_slots(errors)[0];
    if (bad != kNoError) {
      const int64_t b = bad / F, f = bad % F;
      const int64_t id = idx.select(0, b).select(0, f).item<int64_t>();
      TORCH_CHECK_INDEX(id >= 0 && id < N, "compact_embedding: indices[", b, ", ", f, "] = ", id,
                        " is out of range [0, N = ", N, ") where N = remap.numel()");
      const int64_t r = remap_c.select(0, id).item<int64_t>();
      TORCH_CHECK_INDEX(false, "compact_embedding: remap[", id, "] = ", r, " (looked up by indices[", b, ", ", f,
                  "]) is out of range [-1, ", layout.rows[f], ") for field ", f, " (rows in its block of packed)");
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> compact_embedding_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& field_offsets,
    const at::Tensor& field_dims, const at::Tensor& remap, const at::Tensor& indices,
    const std::optional<at::Tensor>& oov, bool deterministic) {
  const int64_t D = grad_out.dim() == 3 ? grad_out.size(2) : -1;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == indices.size(0) && grad_out.size(1) == indices.size(1),
              "compact_embedding: grad_out must have shape (B, F, out_dim) matching indices ", indices.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == packed.scalar_type(), "compact_embedding: grad_out dtype ",
              grad_out.scalar_type(), " must match packed dtype ", packed.scalar_type());
  TORCH_CHECK(grad_out.device() == packed.device(), "compact_embedding: grad_out must be on ", packed.device(),
              ", got ", grad_out.device());
  const CompactLayout layout =
      compact_embedding_check_layout(packed, field_offsets, field_dims, remap, indices, D, oov);
  const int64_t B = indices.size(0), F = indices.size(1), N = remap.numel(), P = packed.numel();
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor grad_packed = at::zeros({P}, packed.options());
  at::Tensor grad_oov = oov.has_value() ? at::zeros({F, D}, packed.options()) : at::empty({0}, packed.options());
  if (B == 0 || F == 0 || D == 0) return {grad_packed, grad_oov};
  const int64_t R = B * F;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor offs_c = field_offsets.contiguous();
  const at::Tensor dims_c = field_dims.contiguous();
  const at::Tensor remap_c = remap.contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const bool has_oov = oov.has_value();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = layout_allows_vec(layout, D, kVec) && aligned16(g.const_data_ptr());
    OPTEMBED_DISPATCH_INDEX(remap_c.scalar_type(), "compact_embedding: remap", [&] {
      using remap_t = index_t;
      OPTEMBED_BOOL_SWITCH(has_oov, kHasOov, [&] {
        if (deterministic) {
          at::Tensor keys = at::empty({R}, idx.options());
          compact_embedding_keys_kernel<remap_t, kHasOov>
              <<<static_cast<unsigned>(ceil_div(R, kBlockThreads)), kBlockThreads, 0, stream>>>(
                  offs_c.const_data_ptr<int64_t>(), dims_c.const_data_ptr<int64_t>(),
                  remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<int64_t>(), keys.mutable_data_ptr<int64_t>(),
                  R, F, N, P);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // Stable: equal destinations keep ascending lookup order.
          const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
          const at::Tensor& sorted_keys = std::get<0>(sorted);
          const at::Tensor& order = std::get<1>(sorted);
          OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
            constexpr int V = kVecOk ? kVec : 1;
            const GroupLaunch L = group_launch(R, D, V, "compact_embedding");
            compact_embedding_segment_kernel<scalar_t, V><<<L.blocks, kBlockThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                dims_c.const_data_ptr<int64_t>(), grad_packed.mutable_data_ptr<scalar_t>(),
                kHasOov ? grad_oov.mutable_data_ptr<scalar_t>() : nullptr, R, F, D, P, L.G);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          constexpr bool kReduced = !std::is_same_v<acc_t, scalar_t>;
          const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
          at::Tensor acc_packed = kReduced ? at::zeros({P}, packed.options().dtype(acc_type)) : grad_packed;
          at::Tensor acc_oov = (kReduced && kHasOov) ? at::zeros({F, D}, packed.options().dtype(acc_type)) : grad_oov;
          OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
            constexpr int V = kVecOk ? kVec : 1;
            const GroupLaunch L = group_launch(R, D, V, "compact_embedding");
            compact_embedding_atomic_kernel<scalar_t, remap_t, kHasOov, V><<<L.blocks, kBlockThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), offs_c.const_data_ptr<int64_t>(), dims_c.const_data_ptr<int64_t>(),
                remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<int64_t>(), acc_packed.mutable_data_ptr<acc_t>(),
                kHasOov ? acc_oov.mutable_data_ptr<acc_t>() : nullptr, R, F, D, N, L.G);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
          if constexpr (kReduced) {
            grad_packed.copy_(acc_packed);
            if (kHasOov) grad_oov.copy_(acc_oov);
          }
        }
      });
    });
  });
  return {grad_packed, grad_oov};
}

}  // namespace
}  // namespace cuda
}  // namespace optembed

TORCH_LIBRARY_IMPL(optembed, CUDA, m) {
  m.impl("compact_embedding_forward", &optembed::cuda::compact_embedding_forward_cuda);
  m.impl("compact_embedding_backward", &optembed::cuda::compact_embedding_backward_cuda);
}
