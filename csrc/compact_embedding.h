// compact_embedding: the layout checks shared by the CPU kernel (csrc/compact_embedding.cpp, where they are
// defined) and the CUDA kernel (csrc/cuda/compact_embedding.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace optembed {

// Host copies of the per-field layout of the packed tables.
struct CompactLayout {
  std::vector<int64_t> offs;  // field_offsets (F + 1)
  std::vector<int64_t> dims;  // field_dims (F)
  std::vector<int64_t> rows;  // rows R_f of each field's block in packed (-1: field_dims 0, any row allowed)
};

// Checks shapes, dtypes and devices (no data, no host copy).
void compact_embedding_check_args(const at::Tensor& packed, const at::Tensor& field_offsets,
                                  const at::Tensor& field_dims, const at::Tensor& remap, const at::Tensor& indices,
                                  int64_t out_dim, const std::optional<at::Tensor>& oov);

// Validates the layout from host copies of field_offsets (F + 1) and field_dims (F) against packed.numel() = P
// (ValueError naming the argument) and returns it.
CompactLayout compact_embedding_layout_from(const int64_t* offs, const int64_t* dims, int64_t F, int64_t P,
                                            int64_t out_dim);

// Both of the above: field_offsets / field_dims are copied to the host (a synchronisation on CUDA).
CompactLayout compact_embedding_check_layout(const at::Tensor& packed, const at::Tensor& field_offsets,
                                             const at::Tensor& field_dims, const at::Tensor& remap,
                                             const at::Tensor& indices, int64_t out_dim,
                                             const std::optional<at::Tensor>& oov);

}  // namespace optembed
