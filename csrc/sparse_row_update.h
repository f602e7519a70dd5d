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

// Lazy weight decay's last-updated steps: None, or an (N,) int64 contiguous tensor on weight's device; with one,
// step must be >= 1 (every optimizer). Raises naming `last_step`.
inline void check_last_step(const std::optional<at::Tensor>& last_step, const at::Tensor& weight, int64_t step,
                            const char* op) {
  if (!last_step.has_value() || !last_step->defined()) return;
  const at::Tensor& l = *last_step;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == weight.size(0), op, ": last_step must have shape (N,) = (",
              weight.size(0), ",), got ", l.sizes());
  TORCH_CHECK(l.scalar_type() == at::kLong, op, ": last_step must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.device() == weight.device(), op, ": last_step must be on the same device as weight (",
              weight.device(), "), got ", l.device());
  TORCH_CHECK(l.is_contiguous(), op, ": last_step must be contiguous (it is updated in place)");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 with last_step (lazy weight decay), got ", step);
}

}  // namespace optembed
