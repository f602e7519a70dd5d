// Shared device helpers for the optembed CUDA kernels.
//
// Row kernels map one *group* of G lanes (G a power of two, 1..32, never spanning two warps) to one
// embedding row of D elements. A lane handles the 16-byte units u = lane, lane + G, ... of the row
// (VEC elements per unit; VEC = 1 is the scalar fallback), and the group reduces with warp shuffles of
// width G. Every lane of a warp must reach the shuffles, so kernels never return before them.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/macros/Macros.h>

#include "common.h"  // argument checks, OPTEMBED_*_SWITCH, step_ste_grad

namespace optembed {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;  // 8 warps; a multiple of every group size

// Elements of T in one 16-byte load.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int VEC, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<A>(v.v[e]);
  }
}

template <int VEC, typename T, typename A>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const A (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<T>(in[e]);
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
  }
}

// Butterfly sum over the G lanes of a group (all 32 lanes of the warp must call it).
template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, group);
  }
  return v;
}

__device__ __forceinline__ float acc_sqrt(float x) {
  return sqrtf(x);
}
__device__ __forceinline__ double acc_sqrt(double x) {
  return sqrt(x);
}

template <typename A>
__device__ __forceinline__ A sign_of(A w) {
  return w > A(0) ? A(1) : (w < A(0) ? A(-1) : A(0));
}

// ---- device-side argument checks ------------------------------------------------------------------------------
// A kernel that validates its inputs records the smallest failing position in an int64 "error slot" (kNoError =
// nothing failed) instead of asserting; the host reads all slots with one copy after the launch and raises a
// Python exception naming the argument (read_error_slots). Out-of-range values never touch memory.
constexpr int64_t kNoError = INT64_MAX;

__device__ __forceinline__ void record_error(int64_t* slot, int64_t pos) {
  atomicMin(reinterpret_cast<long long*>(slot), static_cast<long long>(pos));
}

}  // namespace cuda
}  // namespace optembed

// Host-side helpers -----------------------------------------------------------------------------------
namespace optembed {
namespace cuda {

// Smallest power of two >= units, clamped to [1, 32].
inline int group_size_for(int64_t units) {
  int g = 1;
  while (g < units && g < kWarpSize) g <<= 1;
  return g;
}

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

// True when p (or nullptr) is aligned to `bytes` (the size of a Vec<T, VEC> access).
inline bool aligned_to(const void* p, size_t bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Launch geometry of a group kernel: G lanes per item (G covers the row's VEC-element units, at most a warp),
// kBlockThreads / G items per block.
struct GroupLaunch {
  int G;
  unsigned blocks;
};

inline GroupLaunch group_launch(int64_t items, int64_t D, int vec, const char* op) {
  const int G = group_size_for(ceil_div(D, vec));
  const int64_t blocks = ceil_div(items, kBlockThreads / G);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows for one launch (", items, ")");
  return {G, static_cast<unsigned>(blocks > 0 ? blocks : 1)};
}

// `n` error slots on the device of `like`, all kNoError.
inline at::Tensor make_error_slots(int64_t n, const at::Tensor& like) {
  return at::full({n}, kNoError, like.options().dtype(at::kLong));
}

// Copies the slots to the host (one synchronising copy).
inline std::vector<int64_t> read_error_slots(const at::Tensor& slots) {
  const at::Tensor host = slots.cpu();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

}  // namespace cuda
}  // namespace optembed
