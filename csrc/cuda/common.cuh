// Shared device helpers for the optembed CUDA kernels.
//
// Row kernels map one *group* of G lanes (G a power of two, 1..32, never spanning two warps) to one
// embedding row of D elements. A lane handles the 16-byte units u = lane, lane + G, ... of the row
// (VEC elements per unit; VEC = 1 is the scalar fallback), and the group reduces with warp shuffles of
// width G. Every lane of a warp must reach the shuffles, so kernels never return before them.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
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

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace cuda
}  // namespace optembed
