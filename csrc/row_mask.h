// row_mask: argument checks shared by the CPU kernel (csrc/row_mask.cpp, where they are defined) and the CUDA
// kernel (csrc/cuda/row_mask.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace optembed {

// Raises (naming the argument) unless weight is a floating (N, D) table, field_of_row an int32/int64 (N,) tensor
// and threshold a floating (F,) tensor, all on weight's device, and p is 1 or 2.
void row_mask_check(const at::Tensor& weight, const at::Tensor& field_of_row, const at::Tensor& threshold,
                    int64_t p);

}  // namespace optembed
