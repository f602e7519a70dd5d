// Shared helpers for the optembed ops: argument-check macros and compile-time switch macros.
// Usable from both C++ (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) translation units.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

// ---- argument checks: every message names the argument ------------------------------------------------------
#define OPTEMBED_CHECK_DIM(T, NAME, NDIM)                                                              \
  TORCH_CHECK((T).dim() == (NDIM), NAME " must be a " #NDIM "-D tensor, got shape ", (T).sizes())

#define OPTEMBED_CHECK_SAME_DEVICE(T, REF, NAME, REFNAME)                                              \
  TORCH_CHECK((T).device() == (REF).device(), NAME " must be on the same device as " REFNAME " (",      \
              (REF).device(), "), got ", (T).device())

#define OPTEMBED_CHECK_INDEX_DTYPE(T, NAME)                                                            \
  TORCH_CHECK((T).scalar_type() == at::kLong || (T).scalar_type() == at::kInt,                          \
              NAME " must be int32 or int64, got ", (T).scalar_type())

#define OPTEMBED_CHECK_FLOAT_DTYPE(T, NAME)                                                            \
  TORCH_CHECK(at::isFloatingType((T).scalar_type()) &&                                                  \
                  ((T).scalar_type() == at::kFloat || (T).scalar_type() == at::kDouble ||               \
                   (T).scalar_type() == at::kHalf || (T).scalar_type() == at::kBFloat16),               \
              NAME " must be float32, float64, float16 or bfloat16, got ", (T).scalar_type())

// ---- compile-time variant switches (flash-attention style) ----------------------------------------------------
// Usage: OPTEMBED_BOOL_SWITCH(has_oov, kOov, [&] { kernel<kOov>(...); });
#define OPTEMBED_BOOL_SWITCH(COND, CONST_NAME, ...)                                                    \
  [&] {                                                                                                 \
    if (COND) {                                                                                         \
      constexpr static bool CONST_NAME = true;                                                          \
      return __VA_ARGS__();                                                                             \
    } else {                                                                                            \
      constexpr static bool CONST_NAME = false;                                                         \
      return __VA_ARGS__();                                                                             \
    }                                                                                                   \
  }()

// p-norm order, 1 or 2 (validated by the caller).
#define OPTEMBED_P_SWITCH(P, CONST_NAME, ...)                                                          \
  [&] {                                                                                                 \
    if ((P) == 1) {                                                                                     \
      constexpr static int CONST_NAME = 1;                                                              \
      return __VA_ARGS__();                                                                             \
    } else {                                                                                            \
      constexpr static int CONST_NAME = 2;                                                              \
      return __VA_ARGS__();                                                                             \
    }                                                                                                   \
  }()

// Index dtype switch: binds `index_t` to int32_t or int64_t.
#define OPTEMBED_DISPATCH_INDEX(TYPE, NAME, ...)                                                       \
  [&] {                                                                                                 \
    if ((TYPE) == at::kInt) {                                                                           \
      using index_t = int32_t;                                                                          \
      return __VA_ARGS__();                                                                             \
    } else {                                                                                            \
      TORCH_CHECK((TYPE) == at::kLong, NAME ": unsupported index dtype ", (TYPE));                       \
      using index_t = int64_t;                                                                          \
      return __VA_ARGS__();                                                                             \
    }                                                                                                   \
  }()

// Floating dtypes the ops accept: float32, float64, float16, bfloat16 (accumulation in at::opmath_type).
#define OPTEMBED_DISPATCH_FLOATING(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace optembed {

// Long-tail straight-through estimator of the unit step (OptEmbed):
//   H(x) = 2 - 4|x|  for |x| <= 0.4,   0.4  for 0.4 < |x| <= 1,   0  otherwise (also x = +-inf),   NaN for NaN x
// (a NaN row norm or threshold propagates NaN into the gradients instead of silently stopping them).
template <typename T>
#if defined(__CUDACC__)
__host__ __device__
#endif
inline T step_ste_grad(T x) {
  if (x != x) return x;  // NaN
  const T ax = x < T(0) ? -x : x;
  if (ax <= T(0.4)) return T(2) - T(4) * ax;
  if (ax <= T(1)) return T(0.4);
  return T(0);
}

}  // namespace optembed

#if !defined(__CUDACC__)
// ---- CPU: zero-filled buffers that cost nothing until written ------------------------------------------------
// A dense (N, D) table gradient is mostly zeros (only the looked-up rows are non-zero). Clearing it with memset
// writes every byte and, on a fresh allocation, first takes one page fault per 4 KiB page; for a 1M x 64 float
// table that costs far more than the whole lookup. Anonymous mmap memory is zero-filled by the kernel lazily, page
// by page, on first touch: a gradient backed by it only pays for the pages the backward pass actually writes.
#include <ATen/Functions.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#define OPTEMBED_HAS_MMAP 1
#endif

#include <atomic>
#include <limits>

namespace optembed {

// ---- deterministic error reporting from parallel loops ---------------------------------------------------------
// A parallel pass records the smallest failing position (atomic min) and the caller raises after the pass, so the
// reported position is always the first bad one, whatever the thread count.
constexpr int64_t kNoErrorPos = std::numeric_limits<int64_t>::max();

inline void record_first_error(std::atomic<int64_t>& first_bad, int64_t pos) {
  int64_t cur = first_bad.load(std::memory_order_relaxed);
  while (pos < cur && !first_bad.compare_exchange_weak(cur, pos, std::memory_order_relaxed)) {
  }
}

// Minimum size for which lazily zeroed pages beat a parallel memset (below it the allocation is at::zeros).
constexpr int64_t kLazyZeroMinBytes = int64_t(1) << 22;  // 4 MiB
// Transparent huge page size on x86-64 / aarch64 (4 KiB base pages).
constexpr size_t kHugePageBytes = size_t(1) << 21;  // 2 MiB

// Returns a contiguous zero-filled CPU tensor of `sizes` with `options`; `*lazy` tells whether it is backed by
// untouched zero pages (callers may then skip writing zeros) or was cleared explicitly.
// The mapping is aligned to 2 MiB and advised MADV_HUGEPAGE where the kernel supports it: a scattered write pattern
// (the rows of a batch lie all over the table) then costs one fault per 2 MiB instead of one per 4 KiB, and the
// kernel clears a huge page much faster than it serves 512 small faults.
inline at::Tensor zeros_lazy_cpu(at::IntArrayRef sizes, const at::TensorOptions& options, bool* lazy) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
#if defined(OPTEMBED_HAS_MMAP)
  if (nbytes >= kLazyZeroMinBytes) {
    const size_t len = static_cast<size_t>(nbytes) + kHugePageBytes;  // room to align the start
    void* base = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      *lazy = true;
      const uintptr_t b = reinterpret_cast<uintptr_t>(base);
      void* ptr = reinterpret_cast<void*>((b + kHugePageBytes - 1) & ~(uintptr_t(kHugePageBytes) - 1));
#if defined(MADV_HUGEPAGE)
      (void)::madvise(ptr, static_cast<size_t>(nbytes), MADV_HUGEPAGE);  // advisory: failure is harmless
#endif
      return at::from_blob(
          ptr, sizes, [base, len](void*) { ::munmap(base, len); }, options.device(at::kCPU));
    }
  }
#endif
  *lazy = false;
  return at::zeros(sizes, options);
}

// Row p-norm with 8 independent partial sums (vectorisable without -ffast-math).
template <int P, typename acc_t, typename scalar_t>
inline acc_t row_norm(const scalar_t* __restrict__ row, int64_t D) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t v = static_cast<acc_t>(row[j + u]);
      part[u] += (P == 1) ? std::abs(v) : v * v;
    }
  }
  acc_t tail = 0;
  for (; j < D; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    tail += (P == 1) ? std::abs(v) : v * v;
  }
  const acc_t sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
  if constexpr (P == 2) {
    return std::sqrt(sum);
  } else {
    return sum;
  }
}

// Software prefetch of `bytes` bytes starting at `p` (random table-row accesses are latency-bound without it).
inline void prefetch_row(const void* p, int64_t bytes, bool for_write) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  if (for_write) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
  } else {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
  }
#else
  (void)p;
  (void)bytes;
  (void)for_write;
#endif
}

}  // namespace optembed
#endif  // !__CUDACC__
