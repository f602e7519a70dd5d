// compact_embedding (CUDA): fused mixed-dimension lookup over per-field compact tables, and its backward.
// Semantics and storage layout: csrc/compact_embedding.cpp (packed / field_offsets / field_dims / remap / oov).
//
// Forward, one kernel. One group of G lanes per lookup (b, f) (G = power of two covering out_dim's 16-byte units,
// at most a warp): the group resolves r = remap[indices[b, f]] and copies the D_f leading values of the field's
// row r (or of oov[f] for a pruned id, or zeros) into out[b, f, :D_f] and zero-pads up to out_dim. 16-byte vector
// loads/stores when out_dim and the base pointers allow them (host) and, per lookup, when its field's offset and
// width are multiples of the vector width (device: the layout is never copied to the host for that), scalar
// otherwise. Each output element is written once,
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
#include <ATen/ops/cat.h>
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
// The layout is not validated on the host for unchecked calls (the module validated it once): a field whose block
// does not fit packed (P values) or out_dim (D) serves nothing, so no layout ever makes a kernel touch memory
// outside packed / out; checked calls raise the layout error on the host after the launch.
__device__ __forceinline__ bool field_ok(const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
                                         int64_t f, int64_t P, int64_t D) {
  const int64_t o0 = offs[f], o1 = offs[f + 1], d = dims[f];
  return o0 >= 0 && o0 <= o1 && o1 <= P && d >= 0 && d <= D && (d == 0 ? o1 == o0 : (o1 - o0) % d == 0);
}

template <typename remap_t, typename id_t>
__device__ __forceinline__ int64_t resolve_row(const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
                                               const remap_t* __restrict__ remap, const id_t* __restrict__ indices,
                                               int64_t pos, int64_t f, int64_t N, int64_t P, int64_t D,
                                               int64_t* errors, bool report) {
  if (!field_ok(offs, dims, f, P, D)) return -2;
  const int64_t id = static_cast<int64_t>(indices[pos]);
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
template <typename scalar_t, typename remap_t, typename id_t, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) compact_embedding_forward_kernel(
    const scalar_t* __restrict__ packed, const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
    const remap_t* __restrict__ remap, const id_t* __restrict__ indices, const scalar_t* __restrict__ oov,
    scalar_t* __restrict__ out, int64_t* __restrict__ errors, int64_t R, int64_t F, int64_t D, int64_t N, int64_t P,
    int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (pos >= R) return;  // no shuffles in this kernel
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, P, D, errors, lane == 0);
  const scalar_t* src = nullptr;
  bool vec_src = true;  // 16-byte loads from src: the OOV row always (D % VEC == 0), a packed row when its field's
                        // offset and width are multiples of VEC (decided here, per field: no host copy of the layout)
  if (r >= 0) {
    src = packed + offs[f] + r * d;
    vec_src = VEC == 1 || (offs[f] % VEC == 0 && d % VEC == 0);
  } else if (HAS_OOV && r == -1) {
    src = oov + f * D;
  }
  scalar_t* orow = out + pos * D;
  const int64_t units = D / VEC;
  for (int64_t u = lane; u < units; u += G) {
    const int64_t j0 = u * VEC;
    acc_t v[VEC];
    if (src != nullptr && j0 < d && !vec_src) {  // scalar fallback inside a vector launch
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = j0 + e < d ? static_cast<acc_t>(src[j0 + e]) : acc_t(0);
    } else if (src != nullptr && j0 < d) {
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
template <typename remap_t, typename id_t, bool HAS_OOV>
__global__ void compact_embedding_keys_kernel(const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
                                              const remap_t* __restrict__ remap,
                                              const id_t* __restrict__ indices, int64_t* __restrict__ keys,
                                              int64_t R, int64_t F, int64_t N, int64_t P, int64_t D) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= R) return;
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, P, D, nullptr, false);
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
    if (VEC == 1 || (key % VEC == 0 && d % VEC == 0)) {
      store_vec<VEC>(dst + j0, sum);  // vector path: d % VEC == 0 and an aligned destination
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (j0 + e < d) dst[j0 + e] = static_cast<scalar_t>(sum[e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, fast: atomics into acc_t buffers
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename remap_t, typename id_t, bool HAS_OOV, int VEC>
__global__ void __launch_bounds__(kBlockThreads) compact_embedding_atomic_kernel(
    const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ offs, const int64_t* __restrict__ dims,
    const remap_t* __restrict__ remap, const id_t* __restrict__ indices,
    at::opmath_type<scalar_t>* __restrict__ acc_packed, at::opmath_type<scalar_t>* __restrict__ acc_oov, int64_t R,
    int64_t F, int64_t D, int64_t N, int64_t P, int G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (pos >= R) return;  // no shuffles in this kernel
  const int64_t f = pos % F;
  const int64_t d = dims[f];
  const int64_t r = resolve_row(offs, dims, remap, indices, pos, f, N, P, D, nullptr, false);
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
at::Tensor compact_embedding_forward_cuda(const at::Tensor& packed, const at::Tensor& field_offsets,
                                          const at::Tensor& field_dims, const at::Tensor& remap,
                                          const at::Tensor& indices, int64_t out_dim,
                                          const std::optional<at::Tensor>& oov, bool check_indices) {
  // Shapes, dtypes, devices only: the layout values are read on the device (per-field vector decision, field_ok).
  // Checked calls validate the layout with the same single host copy that reads the error slot (one sync per call);
  // unchecked calls never synchronise (CompactEmbedding validates its layout once, when it is built or loaded).
  compact_embedding_check_args(packed, field_offsets, field_dims, remap, indices, out_dim, oov);
  const int64_t B = indices.size(0), F = indices.size(1), D = out_dim, N = remap.numel(), P = packed.numel();
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({B, F, D}, packed.options());
  if (B * F == 0) {  // no lookups: only the layout is checked
    if (check_indices) compact_embedding_check_layout(packed, field_offsets, field_dims, remap, indices, out_dim, oov);
    return out;
  }
  const int64_t R = B * F;
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor offs_c = field_offsets.contiguous();
  const at::Tensor dims_c = field_dims.contiguous();
  const at::Tensor remap_c = remap.contiguous();
  const at::Tensor idx = indices.contiguous();  // int32 or int64: the kernels are templated on the id type
  const at::Tensor oov_c = oov.has_value() ? oov->contiguous() : at::Tensor();
  at::Tensor errors = check_indices ? make_error_slots(1, packed) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_forward_cuda", [&] {
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = D % kVec == 0 && aligned16(packed_c.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
                        (!oov_c.defined() || aligned16(oov_c.const_data_ptr()));
    OPTEMBED_DISPATCH_INDEX(remap_c.scalar_type(), "compact_embedding: remap", [&] {
      using remap_t = index_t;
      OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "compact_embedding: indices", [&] {
        using id_t = index_t;
        OPTEMBED_BOOL_SWITCH(oov_c.defined(), kHasOov, [&] {
          OPTEMBED_BOOL_SWITCH(vec_ok, kVecOk, [&] {
            constexpr int V = kVecOk ? kVec : 1;
            const GroupLaunch L = group_launch(R, D, V, "compact_embedding");
            compact_embedding_forward_kernel<scalar_t, remap_t, id_t, kHasOov, V>
                <<<L.blocks, kBlockThreads, 0, stream>>>(
                    packed_c.const_data_ptr<scalar_t>(), offs_c.const_data_ptr<int64_t>(),
                    dims_c.const_data_ptr<int64_t>(), remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<id_t>(),
                    kHasOov ? oov_c.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                    errors.defined() ? errors.mutable_data_ptr<int64_t>() : nullptr, R, F, D, N, P, L.G);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });

  if (check_indices) {
    // one copy: [error slot, field_offsets (F + 1), field_dims (F)]
    const std::vector<int64_t> host = read_error_slots(at::cat({errors, offs_c, dims_c}));
    const CompactLayout layout = compact_embedding_layout_from(host.data() + 1, host.data() + 2 + F, F, P, D);
    const int64_t bad = host[0];
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
  // The backward trusts the layout the forward (or the module) validated: no host copy, no synchronisation.
  compact_embedding_check_args(packed, field_offsets, field_dims, remap, indices, D, oov);
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
  const at::Tensor idx = indices.contiguous();  // int32 or int64: the kernels are templated on the id type
  const bool has_oov = oov.has_value();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const bool vec_ok = D % kVec == 0 && aligned16(g.const_data_ptr());  // packed stores: decided per field
    OPTEMBED_DISPATCH_INDEX(remap_c.scalar_type(), "compact_embedding: remap", [&] {
      using remap_t = index_t;
      OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "compact_embedding: indices", [&] {
      using id_t = index_t;
      OPTEMBED_BOOL_SWITCH(has_oov, kHasOov, [&] {
        if (deterministic) {
          at::Tensor keys = at::empty({R}, idx.options().dtype(at::kLong));
          compact_embedding_keys_kernel<remap_t, id_t, kHasOov>
              <<<static_cast<unsigned>(ceil_div(R, kBlockThreads)), kBlockThreads, 0, stream>>>(
                  offs_c.const_data_ptr<int64_t>(), dims_c.const_data_ptr<int64_t>(),
                  remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<id_t>(), keys.mutable_data_ptr<int64_t>(),
                  R, F, N, P, D);
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
            compact_embedding_atomic_kernel<scalar_t, remap_t, id_t, kHasOov, V><<<L.blocks, kBlockThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), offs_c.const_data_ptr<int64_t>(), dims_c.const_data_ptr<int64_t>(),
                remap_c.const_data_ptr<remap_t>(), idx.const_data_ptr<id_t>(), acc_packed.mutable_data_ptr<acc_t>(),
                kHasOov ? acc_oov.mutable_data_ptr<acc_t>() : nullptr, R, F, D, N, P, L.G);
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
