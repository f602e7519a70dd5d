// sparse_row_update: what the CPU kernel (csrc/sparse_row_update.cpp) and the CUDA kernel
// (csrc/cuda/sparse_row_update.cu) share: the optimizer names and the argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace optembed {

enum class RowOptimizer { kSGD, kAdagrad, kAdam };

inline RowOptimizer parse_optimizer(const std::string& name) {
  if (name == "sgd") return RowOptimizer::kSGD;
  if (name == "adagrad") return RowOptimizer::kAdagrad;
  if (name == "adam") return RowOptimizer::kAdam;
  TORCH_CHECK(false, "sparse_row_update: optimizer must be 'sgd', 'adagrad' or 'adam', got '", name, "'");
}

// Raises (naming the argument) on bad shapes, dtypes, devices, optimizer names, states or hyper-parameters;
// defined in csrc/sparse_row_update.cpp.
void sparse_row_update_check(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad_rows,
                             const std::optional<at::Tensor>& state1, const std::optional<at::Tensor>& state2,
                             const std::string& optimizer, double lr, double eps, double beta1, double beta2,
                             double weight_decay, int64_t step);

}  // namespace optembed
