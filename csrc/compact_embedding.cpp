// compact_embedding: fused mixed-dimension lookup over per-field compact tables.
//
// Storage (one flat buffer for all fields, built by optembed_ext.nn.compact / optembed_ext.export):
//   packed        (P,)    float: field f's table is packed[field_offsets[f] : field_offsets[f+1]] viewed
//                         row-major as (R_f, D_f), R_f = (field_offsets[f+1] - field_offsets[f]) / D_f
//   field_offsets (F+1,)  int64, non-decreasing, field_offsets[F] <= P; a field with D_f == 0 has an empty block
//   field_dims    (F,)    int64, 0 <= D_f <= out_dim
//   remap         (N,)    int32/int64: global id -> local row in [0, R_f) of the field that owns the id, or -1
//                         for a pruned id
//   indices       (B, F)  int32/int64 global ids, column f holds ids of field f, each in [0, N)
//   oov           (F, out_dim) optional, same dtype as packed: row served for pruned ids of field f
//
// Forward (one pass, each output element written once, each kept row read once per lookup):
//   r = remap[indices[b, f]]
//   out[b, f, j] = packed[field_offsets[f] + r * D_f + j]         if r >= 0 and j < D_f
//                = oov[f, j] if oov is given else 0               if r == -1 and j < D_f
//                = 0                                              for D_f <= j < out_dim (zero padding)
// Backward (grad_out (B, F, out_dim) -> grad_packed (P,) dense, grad_oov (F, out_dim) or size-0):
//   grad_packed[field_offsets[f] + r * D_f + j] += grad_out[b, f, j]   for r >= 0, j < D_f
//   grad_oov[f, j]                              += grad_out[b, f, j]   for r == -1, j < D_f
//   The padding columns j >= D_f receive no gradient anywhere.
//
// Checks: the small structural tensors (field_offsets, field_dims) are always validated (O(F)); with
// check_indices the kernel also validates every looked-up id (0 <= id < N) and its remapped row
// (-1 <= r < R_f; any r >= -1 when D_f == 0, since nothing is read) and raises naming the argument.
//
// CPU thread mapping: forward parallel over the B*F lookups (at::parallel_for); backward parallel over
// fields: field blocks of packed and rows of grad_oov are disjoint, so there are no races and the
// accumulation order (b ascending) is fixed, i.e. the CPU backward is always deterministic.
// Half/bfloat16 gradients are accumulated in float and rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "compact_embedding.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace optembed {

void compact_embedding_check_args(const at::Tensor& packed, const at::Tensor& field_offsets,
                                  const at::Tensor& field_dims, const at::Tensor& remap, const at::Tensor& indices,
                                  int64_t out_dim, const c10::optional<at::Tensor>& oov) {
  TORCH_CHECK(packed.dim() == 1, "compact_embedding: packed must be 1-D (all field tables flattened), got shape ",
              packed.sizes());
  OPTEMBED_CHECK_FLOAT_DTYPE(packed, "compact_embedding: packed");
  TORCH_CHECK(indices.dim() == 2, "compact_embedding: indices must be 2-D (B, F), got shape ", indices.sizes());
  OPTEMBED_CHECK_INDEX_DTYPE(indices, "compact_embedding: indices");
  TORCH_CHECK(remap.dim() == 1, "compact_embedding: remap must be 1-D (N,), got shape ", remap.sizes());
  OPTEMBED_CHECK_INDEX_DTYPE(remap, "compact_embedding: remap");
  TORCH_CHECK(out_dim >= 0, "compact_embedding: out_dim must be >= 0, got ", out_dim);
  const int64_t F = indices.size(1);
  TORCH_CHECK(field_dims.dim() == 1 && field_dims.size(0) == F,
              "compact_embedding: field_dims must have shape (F,) = (", F, ",), got ", field_dims.sizes());
  TORCH_CHECK(field_dims.scalar_type() == at::kLong, "compact_embedding: field_dims must be int64, got ",
              field_dims.scalar_type());
  TORCH_CHECK(field_offsets.dim() == 1 && field_offsets.size(0) == F + 1,
              "compact_embedding: field_offsets must have shape (F+1,) = (", F + 1, ",), got ",
              field_offsets.sizes());
  TORCH_CHECK(field_offsets.scalar_type() == at::kLong, "compact_embedding: field_offsets must be int64, got ",
              field_offsets.scalar_type());
  for (const auto* t : {&field_offsets, &field_dims, &remap, &indices}) {
    TORCH_CHECK(t->device() == packed.device(), "compact_embedding: all tensors must be on ", packed.device(),
                ", got one on ", t->device());
  }
  if (oov.has_value()) {
    TORCH_CHECK(oov->dim() == 2 && oov->size(0) == F && oov->size(1) == out_dim,
                "compact_embedding: oov must have shape (F, out_dim) = (", F, ", ", out_dim, "), got ",
                oov->sizes());
    TORCH_CHECK(oov->scalar_type() == packed.scalar_type(), "compact_embedding: oov dtype ", oov->scalar_type(),
                " must match packed dtype ", packed.scalar_type());
    TORCH_CHECK(oov->device() == packed.device(), "compact_embedding: oov must be on ", packed.device());
  }
}

CompactLayout compact_embedding_layout_from(const int64_t* offs_in, const int64_t* dims_in, int64_t F, int64_t P,
                                            int64_t out_dim) {
  CompactLayout L;
  L.offs.assign(offs_in, offs_in + F + 1);
  L.dims.assign(dims_in, dims_in + F);
  const std::vector<int64_t>& offs = L.offs;
  const std::vector<int64_t>& dims = L.dims;
  std::vector<int64_t>& rows = L.rows;
  // Layout values: ValueError naming the argument (optembed_ext.reference.compact_embedding raises the same).
  TORCH_CHECK_VALUE(offs[0] >= 0, "compact_embedding: field_offsets[0] must be >= 0, got ", offs[0]);
  TORCH_CHECK_VALUE(offs[F] <= P, "compact_embedding: field_offsets[F] = ", offs[F], " exceeds packed.numel() = ",
                    P);
  rows.resize(F);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t d = dims[f];
    TORCH_CHECK_VALUE(d >= 0 && d <= out_dim, "compact_embedding: field_dims[", f, "] = ", d,
                      " must lie in [0, out_dim = ", out_dim, "]");
    const int64_t len = offs[f + 1] - offs[f];
    TORCH_CHECK_VALUE(len >= 0, "compact_embedding: field_offsets must be non-decreasing, field_offsets[", f,
                      "] = ", offs[f], " > field_offsets[", f + 1, "] = ", offs[f + 1]);
    if (d == 0) {
      TORCH_CHECK_VALUE(len == 0, "compact_embedding: field ", f, " has field_dims 0 but a non-empty block of ",
                        len, " values in packed (field_offsets[", f, "] = ", offs[f], ", field_offsets[", f + 1,
                        "] = ", offs[f + 1], ")");
      rows[f] = -1;
    } else {
      TORCH_CHECK_VALUE(len % d == 0, "compact_embedding: block of field ", f, " in packed has ", len,
                        " values (field_offsets[", f + 1, "] - field_offsets[", f, "]), not a multiple of field_dims[",
                        f, "] = ", d);
      rows[f] = len / d;
    }
  }
  return L;
}

CompactLayout compact_embedding_check_layout(const at::Tensor& packed, const at::Tensor& field_offsets,
                                             const at::Tensor& field_dims, const at::Tensor& remap,
                                             const at::Tensor& indices, int64_t out_dim,
                                             const c10::optional<at::Tensor>& oov) {
  compact_embedding_check_args(packed, field_offsets, field_dims, remap, indices, out_dim, oov);
  const int64_t F = indices.size(1);
  const at::Tensor offs_cpu = field_offsets.to(at::kCPU).contiguous();
  const at::Tensor dims_cpu = field_dims.to(at::kCPU).contiguous();
  return compact_embedding_layout_from(offs_cpu.const_data_ptr<int64_t>(), dims_cpu.const_data_ptr<int64_t>(), F,
                                       packed.numel(), out_dim);
}

namespace {

constexpr int64_t kNoError = kNoErrorPos;

inline void record_error(std::atomic<int64_t>& first_bad, int64_t pos) {
  record_first_error(first_bad, pos);
}

// Local row of lookup `p` (field f): r >= -1, or -2 when the id (0 <= id < N) or the remapped row
// (-1 <= r < R_f; any r >= -1 when D_f == 0) is out of range. Always checked (two compares): an invalid lookup
// never reads remap or packed outside their bounds, and never writes a gradient, whatever check_indices says.
template <typename index_t, typename remap_t>
inline int64_t resolve_row(const index_t* indices, const remap_t* remap, const int64_t* rows, int64_t p, int64_t f,
                           int64_t N) {
  const int64_t id = static_cast<int64_t>(indices[p]);
  if (id < 0 || id >= N) return -2;
  const int64_t r = static_cast<int64_t>(remap[id]);
  if (r < -1 || (rows[f] >= 0 && r >= rows[f])) return -2;
  return r;
}


template <typename scalar_t, typename index_t, typename remap_t, bool kHasOov>
void forward_kernel(const scalar_t* packed, const int64_t* offs, const int64_t* dims, const remap_t* remap,
                    const index_t* indices, const scalar_t* oov, const int64_t* rows, scalar_t* out, int64_t B,
                    int64_t F, int64_t D, int64_t N, bool check, std::atomic<int64_t>& first_bad) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * F, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t f = p % F;
      const int64_t d = dims[f];
      scalar_t* o = out + p * D;
      const int64_t r = resolve_row(indices, remap, rows, p, f, N);
      if (r == -2) {  // invalid lookup: zeros (raised after the pass when checking)
        if (check) record_error(first_bad, p);
        std::fill(o, o + D, scalar_t(0));
        continue;
      }
      if (r >= 0) {
        std::memcpy(o, packed + offs[f] + r * d, sizeof(scalar_t) * d);
      } else if (kHasOov) {
        std::memcpy(o, oov + f * D, sizeof(scalar_t) * d);
      } else {
        std::fill(o, o + d, scalar_t(0));
      }
      std::fill(o + d, o + D, scalar_t(0));
    }
  });
}

template <typename scalar_t, typename acc_t, typename index_t, typename remap_t, bool kHasOov>
void backward_kernel(const scalar_t* grad_out, const int64_t* offs, const int64_t* dims, const remap_t* remap,
                     const index_t* indices, const int64_t* rows, acc_t* grad_packed, acc_t* grad_oov, int64_t B,
                     int64_t F, int64_t D, int64_t N) {
  // About at::internal::GRAIN_SIZE gradient elements per task: small problems stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(B * D, 1));
  at::parallel_for(0, F, grain, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t d = dims[f];
      if (d == 0) continue;
      acc_t* block = grad_packed + offs[f];
      for (int64_t b = 0; b < B; ++b) {
        const int64_t p = b * F + f;
        const int64_t r = resolve_row(indices, remap, rows, p, f, N);  // invalid (-2): no gradient anywhere
        const scalar_t* g = grad_out + p * D;
        acc_t* dst;
        if (r >= 0) {
          dst = block + r * d;
        } else if (kHasOov && r == -1) {
          dst = grad_oov + f * D;
        } else {
          continue;
        }
        for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<acc_t>(g[j]);
      }
    }
  });
}

at::Tensor compact_embedding_forward_cpu(const at::Tensor& packed, const at::Tensor& field_offsets,
                                         const at::Tensor& field_dims, const at::Tensor& remap,
                                         const at::Tensor& indices, int64_t out_dim,
                                         const c10::optional<at::Tensor>& oov, bool check_indices) {
  const std::vector<int64_t> rows =
      compact_embedding_check_layout(packed, field_offsets, field_dims, remap, indices, out_dim, oov).rows;
  const int64_t B = indices.size(0), F = indices.size(1), D = out_dim, N = remap.numel();
  at::Tensor out = at::empty({B, F, D}, packed.options());
  if (B * F == 0) return out;  // no lookups: nothing to check (out_dim = 0 still checks the ids)
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor offs_c = field_offsets.contiguous();
  const at::Tensor dims_c = field_dims.contiguous();
  const at::Tensor remap_c = remap.contiguous();
  const at::Tensor idx_c = indices.contiguous();
  const at::Tensor oov_c = oov.has_value() ? oov->contiguous() : at::Tensor();
  std::atomic<int64_t> first_bad{kNoError};
  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_forward", [&] {
    OPTEMBED_DISPATCH_INDEX(remap.scalar_type(), "remap", [&] {
      using remap_t = index_t;
      OPTEMBED_DISPATCH_INDEX(indices.scalar_type(), "indices", [&] {
        OPTEMBED_BOOL_SWITCH(oov.has_value(), kHasOov, [&] {
          forward_kernel<scalar_t, index_t, remap_t, kHasOov>(
              packed_c.data_ptr<scalar_t>(), offs_c.data_ptr<int64_t>(), dims_c.data_ptr<int64_t>(),
              remap_c.data_ptr<remap_t>(), idx_c.data_ptr<index_t>(),
              kHasOov ? oov_c.data_ptr<scalar_t>() : nullptr, rows.data(), out.data_ptr<scalar_t>(), B, F, D, N,
              check_indices, first_bad);
        });
      });
    });
  });
  const int64_t bad = first_bad.load();
  if (bad != kNoError) {
    const int64_t b = bad / F, f = bad % F;
    const int64_t id = idx_c.scalar_type() == at::kInt ? idx_c.data_ptr<int32_t>()[bad] : idx_c.data_ptr<int64_t>()[bad];
    TORCH_CHECK_INDEX(id >= 0 && id < N, "compact_embedding: indices[", b, ", ", f, "] = ", id,
                      " is out of range [0, N = ", N, ") where N = remap.numel()");
    const int64_t r = remap_c.scalar_type() == at::kInt ? remap_c.data_ptr<int32_t>()[id] : remap_c.data_ptr<int64_t>()[id];
    TORCH_CHECK_INDEX(false, "compact_embedding: remap[", id, "] = ", r, " (looked up by indices[", b, ", ", f,
                "]) is out of range [-1, ", rows[f], ") for field ", f, " (rows in its block of packed)");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> compact_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& field_offsets,
    const at::Tensor& field_dims, const at::Tensor& remap, const at::Tensor& indices,
    const c10::optional<at::Tensor>& oov, bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  const int64_t D = grad_out.dim() == 3 ? grad_out.size(2) : -1;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == indices.size(0) && grad_out.size(1) == indices.size(1),
              "compact_embedding: grad_out must have shape (B, F, out_dim) matching indices ", indices.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == packed.scalar_type(), "compact_embedding: grad_out dtype ",
              grad_out.scalar_type(), " must match packed dtype ", packed.scalar_type());
  const std::vector<int64_t> rows =
      compact_embedding_check_layout(packed, field_offsets, field_dims, remap, indices, D, oov).rows;
  const int64_t B = indices.size(0), F = indices.size(1), N = remap.numel();
  at::Tensor grad_packed = at::zeros_like(packed, at::MemoryFormat::Contiguous);
  at::Tensor grad_oov = oov.has_value() ? at::zeros_like(*oov, at::MemoryFormat::Contiguous)
                                        : at::empty({0}, packed.options());
  if (B == 0 || F == 0 || D == 0) return {grad_packed, grad_oov};
  const at::Tensor g_c = grad_out.contiguous();
  const at::Tensor offs_c = field_offsets.contiguous();
  const at::Tensor dims_c = field_dims.contiguous();
  const at::Tensor remap_c = remap.contiguous();
  const at::Tensor idx_c = indices.contiguous();
  OPTEMBED_DISPATCH_FLOATING(packed.scalar_type(), "compact_embedding_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool reduced = !std::is_same<acc_t, scalar_t>::value;
    at::Tensor acc_packed = reduced ? at::zeros(packed.sizes(), packed.options().dtype(at::CppTypeToScalarType<acc_t>::value)) : grad_packed;
    at::Tensor acc_oov = reduced && oov.has_value()
                             ? at::zeros(oov->sizes(), packed.options().dtype(at::CppTypeToScalarType<acc_t>::value))
                             : grad_oov;
    OPTEMBED_DISPATCH_INDEX(remap.scalar_type(), "remap", [&] {
      using remap_t = index_t;
      OPTEMBED_DISPATCH_INDEX(indices.scalar_type(), "indices", [&] {
        OPTEMBED_BOOL_SWITCH(oov.has_value(), kHasOov, [&] {
          backward_kernel<scalar_t, acc_t, index_t, remap_t, kHasOov>(
              g_c.data_ptr<scalar_t>(), offs_c.data_ptr<int64_t>(), dims_c.data_ptr<int64_t>(),
              remap_c.data_ptr<remap_t>(), idx_c.data_ptr<index_t>(), rows.data(), acc_packed.data_ptr<acc_t>(),
              kHasOov ? acc_oov.data_ptr<acc_t>() : nullptr, B, F, D, N);
        });
      });
    });
    if (reduced) {
      grad_packed.copy_(acc_packed);
      if (oov.has_value()) grad_oov.copy_(acc_oov);
    }
  });
  return {grad_packed, grad_oov};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optembed, m) {
  // Semantics: see the comment at the top of this file.
  m.def(
      "compact_embedding_forward(Tensor packed, Tensor field_offsets, Tensor field_dims, Tensor remap, "
      "Tensor indices, int out_dim, Tensor? oov, bool check_indices) -> Tensor");
  m.def(
      "compact_embedding_backward(Tensor grad_out, Tensor packed, Tensor field_offsets, Tensor field_dims, "
      "Tensor remap, Tensor indices, Tensor? oov, bool deterministic) -> (Tensor grad_packed, Tensor grad_oov)");
}

TORCH_LIBRARY_IMPL(optembed, CPU, m) {
  m.impl("compact_embedding_forward", &compact_embedding_forward_cpu);
  m.impl("compact_embedding_backward", &compact_embedding_backward_cpu);
}

}  // namespace optembed
