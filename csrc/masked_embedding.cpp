// masked_embedding: fused OptEmbed lookup = gather + row p-norm + learned field threshold (unit step with a
// long-tail straight-through estimator) + OOV blend + per-sample kept-dimension prefix mask.
//
//   weight (N, D), indices (B, F) int32/int64 global rows, threshold (F,) or none, dims none / (F,) / (B, F) in
//   [0, D], p in {1, 2}, oov_weight (F, D) or none.
//   n = ||weight[r]||_p over the full row (r = indices[b, f]),  x = n - threshold[f],  m = (x > 0)  (m = 1 without
//   threshold),  k = dims[b, f] (or dims[f], or D)
//   out[b, f, j] = (m * w[r, j] + (1 - m) * oov[f, j])  for j < k   (the oov term only with oov_weight), else 0
//
// Backward (H = long-tail STE of the step, see common.h):
//   s = sum_{j<k} g[b,f,j] * (w[r,j] - oov[f,j])
//   grad_w[r, j]  += m * g[b,f,j] * [j<k] + s * H(x) * dn/dw[r,j]     (dn/dw = sign(w) for p = 1, w / n for p = 2)
//   grad_t[f]     -= s * H(x)
//   grad_oov[f,j] += (1 - m) * g[b,f,j] * [j<k]
//
// Non-finite values (same in the CUDA kernel and optembed_ext/reference.py): IEEE arithmetic on these formulas with
// m = step(x) = NaN and H(NaN) = NaN for a NaN x (NaN in the row, NaN threshold when unchecked, inf - inf): out is
// NaN on [0, k), the row's whole gradient, grad_t[f] and grad_oov[f, :k] are NaN. x = +-inf (threshold -+inf, or
// an inf norm) is a plain keep / prune with H = 0: no STE term at all (never 0 * inf). [j<k] is structural: the
// positions j >= k are exact zeros and receive nothing.
// check_indices=True: a NaN threshold (ValueError), the first out-of-range index (IndexError), then the first dims
// value outside [0, D] (ValueError) are raised, in that order, when there is at least one lookup. check_indices=False
// checks nothing: an out-of-range index yields a zero row and norm 0 and never touches the table, dims are clamped.
// The backward clamps dims and checks the indices (IndexError naming the first bad one; it never writes outside).
//
// CPU design
//   forward   one pass, parallel over the B*F lookups (at::parallel_for): each lookup reads its table row once,
//             computes the norm, compares, writes its output row once (masked / blended / zero-padded) and its
//             norm. Index and dims range checks happen inside this pass (raised after, naming the argument).
//             The row reads are random and latency-bound: the table row of the lookup kRowPrefetchDistance ahead
//             is prefetched, so several misses are in flight at once.
//   backward  sparse=True: one parallel pass over lookups writes the per-lookup gradient rows (B*F, D); no
//             reduction at all (the caller wraps them as an uncoalesced COO tensor). Table rows are prefetched as
//             in the forward; large float outputs are written with non-temporal stores (store_row_stream).
//             dense: grad_weight (N, D) is allocated zero-filled without touching it (zeros_lazy_cpu: fresh
//             anonymous pages, 2 MiB-aligned and advised as transparent huge pages, so only the pages of
//             looked-up rows are ever materialised, at one fault per 2 MiB; a memset of the whole table would
//             cost more than the rest of the op). The lookups are stable-radix-sorted by row
//             (O(B*F) per 11-bit digit, never O(N)), then one parallel pass over the sorted lookups sums each
//             touched row's gradient rows in ascending lookup order and writes the row once (no atomics, no races;
//             chunks split the lookups, not the rows; a row looked up kHotRun times or more is first summed in
//             fixed segments of kHotSeg lookups, in parallel, whose partials its owner adds in segment order, so
//             a very frequent row cannot unbalance the threads and the result does not depend on their number).
//             grad_threshold / grad_oov: per-lookup STE scalars are kept in a (B*F,) buffer, then reduced per field
//             in ascending batch order (parallel over fields).
//   The accumulation order never depends on the thread count, so the CPU backward is always deterministic;
//   the `deterministic` flag is accepted for the CUDA kernel's sake. float16/bfloat16 accumulate in float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "row_update.h"
#include "sparse_row_update.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace optembed {
namespace {

using at::Tensor;

template <typename T>
inline T sign_of(T v) {
  return static_cast<T>((T(0) < v) - (v < T(0)));
}

struct Problem {
  int64_t B = 0, F = 0, N = 0, D = 0;
  int64_t dims_bstride = 0;  // 0 for dims (F,), F for dims (B, F)
};

// ---- argument checks shared by forward and backward --------------------------------------------------------------
Problem check_common(const Tensor& weight, const Tensor& indices, const std::optional<Tensor>& threshold,
                     const std::optional<Tensor>& dims, int64_t p, const std::optional<Tensor>& oov_weight,
                     const char* op) {
  OPTEMBED_CHECK_DIM(weight, "weight", 2);
  OPTEMBED_CHECK_FLOAT_DTYPE(weight, "weight");
  OPTEMBED_CHECK_DIM(indices, "indices", 2);
  OPTEMBED_CHECK_INDEX_DTYPE(indices, "indices");
  OPTEMBED_CHECK_SAME_DEVICE(indices, weight, "indices", "weight");
  TORCH_CHECK_VALUE(p == 1 || p == 2, op, ": p must be 1 or 2, got ", p);
  Problem pr;
  pr.N = weight.size(0);
  pr.D = weight.size(1);
  pr.B = indices.size(0);
  pr.F = indices.size(1);
  if (threshold.has_value()) {
    const Tensor& t = *threshold;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == pr.F, op, ": threshold must have shape (F,) = (", pr.F,
                ",) matching indices.size(1), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": threshold must be floating point, got ",
                t.scalar_type());
    OPTEMBED_CHECK_SAME_DEVICE(t, weight, "threshold", "weight");
  }
  if (dims.has_value()) {
    const Tensor& d = *dims;
    TORCH_CHECK(d.scalar_type() == at::kLong || d.scalar_type() == at::kInt, op,
                ": dims must be int32 or int64, got ", d.scalar_type());
    TORCH_CHECK((d.dim() == 1 && d.size(0) == pr.F) || (d.dim() == 2 && d.size(0) == pr.B && d.size(1) == pr.F),
                op, ": dims must have shape (F,) = (", pr.F, ",) or (B, F) = (", pr.B, ", ", pr.F, "), got ",
                d.sizes());
    OPTEMBED_CHECK_SAME_DEVICE(d, weight, "dims", "weight");
    pr.dims_bstride = d.dim() == 2 ? pr.F : 0;
  }
  if (oov_weight.has_value()) {
    const Tensor& o = *oov_weight;
    TORCH_CHECK(o.dim() == 2 && o.size(0) == pr.F && o.size(1) == pr.D, op,
                ": oov_weight must have shape (F, D) = (", pr.F, ", ", pr.D, "), got ", o.sizes());
    TORCH_CHECK(o.scalar_type() == weight.scalar_type(), op, ": oov_weight dtype ", o.scalar_type(),
                " must match weight dtype ", weight.scalar_type());
    OPTEMBED_CHECK_SAME_DEVICE(o, weight, "oov_weight", "weight");
  }
  return pr;
}

inline at::ScalarType norm_dtype_for(at::ScalarType w) {
  return w == at::kDouble ? at::kDouble : at::kFloat;
}

// Threshold as a contiguous accumulation-type vector. With `check_nan` (the forward with check_indices=True and at
// least one lookup) a NaN is rejected naming the field; unchecked, a NaN threshold propagates NaN to its field.
Tensor prepare_threshold(const std::optional<Tensor>& threshold, at::ScalarType acc, const char* op, bool check_nan) {
  if (!threshold.has_value()) return Tensor();
  Tensor t = threshold->to(acc).contiguous();
  if (check_nan) {
    AT_DISPATCH_FLOATING_TYPES(acc, "optembed_threshold_nan_check", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      for (int64_t f = 0; f < t.numel(); ++f) {
        TORCH_CHECK_VALUE(!std::isnan(tp[f]), op, ": threshold[", f, "] is NaN");
      }
    });
  }
  return t;
}

// dims value clamped to [0, D] (the forward validated it when checking; unchecked calls clamp).
inline int64_t clamp_dims(int64_t k, int64_t D) {
  return k < 0 ? 0 : (k > D ? D : k);
}

template <typename acc_t>
inline acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

Tensor prepare_dims(const std::optional<Tensor>& dims) {
  if (!dims.has_value()) return Tensor();
  return dims->to(at::kLong).contiguous();
}

[[noreturn]] void raise_bad_index(int64_t pos, int64_t F, int64_t value, int64_t N) {
  TORCH_CHECK_INDEX(false, "indices[", pos / F, ", ", pos % F, "] = ", value,
                    " is out of range for weight with N = ", N, " rows (valid ids are 0 <= id < N)");
}

[[noreturn]] void raise_bad_dims(int64_t pos, const Problem& pr, int64_t value) {
  if (pr.dims_bstride == 0) {
    TORCH_CHECK_VALUE(false, "dims[", pos % pr.F, "] = ", value, " must lie in [0, D = ", pr.D, "]");
  }
  TORCH_CHECK_VALUE(false, "dims[", pos / pr.F, ", ", pos % pr.F, "] = ", value, " must lie in [0, D = ", pr.D,
                    "]");
}

inline int64_t grain_for(int64_t D) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t D) {
  for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// store_row for an output that is written once and not read back soon (per-lookup gradient rows, B*F*D elements,
// larger than the caches): float rows go out with non-temporal stores, which skip reading each destination line
// into the cache first (a third less memory traffic for the write). Call stream_fence() after the last one.
// Only outputs of at least kStreamMinBytes stream (`stream`); smaller ones stay in the cache for their reader.
constexpr int64_t kStreamMinBytes = int64_t(1) << 23;  // 8 MiB

template <typename scalar_t, typename acc_t>
inline void store_row_stream(scalar_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t D, bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (stream && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      int64_t j = 0;
      for (; j + 4 <= D; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
      for (; j < D; ++j) dst[j] = src[j];
      return;
    }
  }
#else
  (void)stream;
#endif
  store_row(dst, src, D);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

#if defined(__SSE2__)
// Columns j .. j + 3 that lie below k: all-ones where j + lane < k, zero elsewhere (0 <= j, k <= D < 2^31).
inline __m128 prefix_lanes(int64_t j, int64_t k) {
  const __m128i col = _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(j)), _mm_setr_epi32(0, 1, 2, 3));
  return _mm_castsi128_ps(_mm_cmplt_epi32(col, _mm_set1_epi32(static_cast<int32_t>(k))));
}
#endif

// dst[j] = src[j] for j < k, 0 for k <= j < D (src == nullptr: all zeros). k >= D (every lookup without dims) is a
// straight copy; a float row cut at k < D takes masked 4-lane blocks over the whole row instead of a loop whose trip
// count depends on k (the supernet's k is random per lookup, and the exits of k-length loops are mispredicted).
template <typename scalar_t>
inline void copy_prefix(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t k, int64_t D) {
  if (src == nullptr) {
    for (int64_t j = 0; j < D; ++j) dst[j] = scalar_t(0);
    return;
  }
  if (k >= D) {
    for (int64_t j = 0; j < D; ++j) dst[j] = src[j];
    return;
  }
  int64_t j = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + 4 <= D; j += 4) _mm_storeu_ps(dst + j, _mm_and_ps(_mm_loadu_ps(src + j), prefix_lanes(j, k)));
  }
#endif
  for (; j < D; ++j) dst[j] = j < k ? src[j] : scalar_t(0);
}

// ---- forward ------------------------------------------------------------------------------------------------------
// Lookups ahead whose table row is prefetched: the row reads are random and latency-bound, so the loop keeps several
// misses in flight instead of waiting for one row at a time.
constexpr int64_t kRowPrefetchDistance = 8;
// The sorted backward splits a row looked up at least kHotRun times into partial sums of kHotSeg lookups each.
constexpr int64_t kHotRun = 4096;
constexpr int64_t kHotSeg = 2048;

// An out-of-range index (possible only with check_indices=False, or on the way to the error) never touches the
// table: its output row is zeros and its norm 0. Out-of-range dims are recorded (checking) and clamped to [0, D].
// A NaN x = norm - threshold (NaN in the row, NaN threshold, or inf - inf) gives NaN in out[b, f, :k].
template <typename scalar_t, typename index_t, int P, bool kThr>
void forward_kernel(const Problem& pr, const scalar_t* __restrict__ w, const index_t* __restrict__ idx,
                    const at::opmath_type<scalar_t>* __restrict__ thr, const int64_t* __restrict__ dims,
                    const scalar_t* __restrict__ oov, bool check, scalar_t* __restrict__ out,
                    at::opmath_type<scalar_t>* __restrict__ norm, std::atomic<int64_t>& bad_index,
                    std::atomic<int64_t>& bad_dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = pr.F, D = pr.D, N = pr.N;
  const int64_t L = pr.B * F;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = std::is_same_v<scalar_t, float> && L * row_bytes >= kStreamMinBytes;
  at::parallel_for(0, L, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row_buf(stream ? static_cast<size_t>(D) : 0);
    const int64_t pf_end = std::min(end, begin + kRowPrefetchDistance);
    for (int64_t q = begin; q < pf_end; ++q) {
      const int64_t r = static_cast<int64_t>(idx[q]);
      if (r >= 0 && r < N) prefetch_row(w + r * D, row_bytes, false);
    }
    int64_t f = begin % F, b = begin / F;  // (b, f) of pos, advanced without a division per lookup
    for (int64_t pos = begin; pos < end; ++pos, (f + 1 == F ? (f = 0, ++b) : ++f)) {
      if (pos + kRowPrefetchDistance < end) {
        const int64_t rn = static_cast<int64_t>(idx[pos + kRowPrefetchDistance]);
        if (rn >= 0 && rn < N) prefetch_row(w + rn * D, row_bytes, false);
      }
      const int64_t r = static_cast<int64_t>(idx[pos]);
      const bool valid = r >= 0 && r < N;
      if (check && !valid) record_first_error(bad_index, pos);
      int64_t k = D;
      if (dims != nullptr) {
        k = dims[b * pr.dims_bstride + f];
        if (k < 0 || k > D) {
          if (check) record_first_error(bad_dims, pos);
          k = clamp_dims(k, D);
        }
      }
      scalar_t* o = out + pos * D;
      if (!valid) {
        norm[pos] = acc_t(0);
        for (int64_t j = 0; j < D; ++j) o[j] = scalar_t(0);
        continue;
      }
      const scalar_t* row = w + r * D;
      const acc_t n = row_norm<P, acc_t>(row, D);
      norm[pos] = n;
      bool m = true;
      if constexpr (kThr) {
        const acc_t x = n - thr[f];
        if (std::isnan(x)) {
          const scalar_t nan = static_cast<scalar_t>(quiet_nan<acc_t>());
          for (int64_t j = 0; j < k; ++j) o[j] = nan;
          for (int64_t j = k; j < D; ++j) o[j] = scalar_t(0);
          continue;
        }
        m = x > acc_t(0);
      }
      const scalar_t* src = m ? row : (oov != nullptr ? oov + f * D : nullptr);
      // A large float output goes out with non-temporal stores (no read of each destination line first): the row
      // is assembled in a small buffer that stays in L1, then streamed.
      scalar_t* dst = stream ? row_buf.data() : o;
      copy_prefix(dst, src, k, D);
      if (stream) store_row_stream(o, dst, D, true);
    }
    if (stream) stream_fence();
  });
}

std::tuple<Tensor, Tensor> masked_embedding_forward_cpu(const Tensor& weight, const Tensor& indices,
                                                        const std::optional<Tensor>& threshold,
                                                        const std::optional<Tensor>& dims, int64_t p,
                                                        const std::optional<Tensor>& oov_weight,
                                                        bool check_indices) {
  const char* op = "masked_embedding_forward";
  const Problem pr = check_common(weight, indices, threshold, dims, p, oov_weight, op);
  const at::ScalarType acc = norm_dtype_for(weight.scalar_type());
  Tensor out = at::empty({pr.B, pr.F, pr.D}, weight.options());
  Tensor norm = at::empty({pr.B, pr.F}, weight.options().dtype(acc));
  // Data checks (as on CUDA) look at the lookups only: without lookups nothing is checked.
  if (pr.B * pr.F == 0) return {out, norm};
  const Tensor thr = prepare_threshold(threshold, acc, op, check_indices);
  const Tensor w = weight.contiguous();
  const Tensor idx = indices.contiguous();
  const Tensor d = prepare_dims(dims);
  const Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : Tensor();
  std::atomic<int64_t> bad_index{kNoErrorPos}, bad_dims{kNoErrorPos};

  OPTEMBED_DISPATCH_FLOATING(w.scalar_type(), "masked_embedding_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "indices", [&] {
      OPTEMBED_P_SWITCH(p, kP, [&] {
        OPTEMBED_BOOL_SWITCH(thr.defined(), kThr, [&] {
          forward_kernel<scalar_t, index_t, kP, kThr>(
              pr, w.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(),
              thr.defined() ? thr.const_data_ptr<acc_t>() : nullptr,
              d.defined() ? d.const_data_ptr<int64_t>() : nullptr,
              oov.defined() ? oov.const_data_ptr<scalar_t>() : nullptr, check_indices,
              out.mutable_data_ptr<scalar_t>(), norm.mutable_data_ptr<acc_t>(), bad_index, bad_dims);
        });
      });
    });
  });
  // Same order as the CUDA kernel: threshold (above), then the first bad index, then the first bad dims value.
  if (const int64_t pos = bad_index.load(); pos != kNoErrorPos) {
    const int64_t r = idx.scalar_type() == at::kInt ? idx.const_data_ptr<int32_t>()[pos]
                                                    : idx.const_data_ptr<int64_t>()[pos];
    raise_bad_index(pos, pr.F, r, pr.N);
  }
  if (const int64_t pos = bad_dims.load(); pos != kNoErrorPos) {
    raise_bad_dims(pos, pr, d.const_data_ptr<int64_t>()[(pos / pr.F) * pr.dims_bstride + pos % pr.F]);
  }
  return {out, norm};
}

// ---- backward -----------------------------------------------------------------------------------------------------
// sum_{j<k} g[j] * (w[j] - o[j]) (o may be null) with independent partial sums; float rows use explicit SSE (the
// generic loop is a serial dependency chain the compiler does not reorder without -ffast-math).
template <typename scalar_t, typename acc_t>
inline acc_t dot_minus(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                       const scalar_t* __restrict__ o, int64_t k) {
  int64_t j = 0;
  acc_t tail = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
    for (; j + 8 <= k; j += 8) {
      __m128 w0 = _mm_loadu_ps(w + j), w1 = _mm_loadu_ps(w + j + 4);
      if (o != nullptr) {
        w0 = _mm_sub_ps(w0, _mm_loadu_ps(o + j));
        w1 = _mm_sub_ps(w1, _mm_loadu_ps(o + j + 4));
      }
      a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_loadu_ps(g + j), w0));
      a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_loadu_ps(g + j + 4), w1));
    }
    alignas(16) float part[4];
    _mm_store_ps(part, _mm_add_ps(a0, a1));
    tail = (part[0] + part[1]) + (part[2] + part[3]);
  }
#endif
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; j + 8 <= k; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t wv = static_cast<acc_t>(w[j + u]) - (o != nullptr ? static_cast<acc_t>(o[j + u]) : acc_t(0));
      part[u] += static_cast<acc_t>(g[j + u]) * wv;
    }
  }
  for (; j < k; ++j) {
    tail += static_cast<acc_t>(g[j]) * (static_cast<acc_t>(w[j]) - (o != nullptr ? static_cast<acc_t>(o[j]) : acc_t(0)));
  }
  return tail + (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
}

#if defined(__SSE2__)
// lookup_grad for a float row with a threshold and a non-NaN x = n - t. The mask m = (x > 0) and H(x) are selects,
// not branches, and the k columns are whole 8-column blocks plus one masked block (no scalar loop over k % 8): in
// the supernet m is a coin flip per lookup and k is random, so branches on them are unpredictable. One pass over g:
// acc[j] += m * g[j] and s += g[j] * (w[j] - o[j]) for j < k (two 4-lane partial sums; lanes at or beyond k add
// exact zeros whatever the row holds there); returns s * H(x), or 0 where H(x) = 0.
inline float lookup_grad_ste_f32(const float* __restrict__ g, const float* __restrict__ w,
                                 const float* __restrict__ o, int64_t k, int64_t D, float x,
                                 float* __restrict__ acc) {
  const float ax = std::fabs(x);
  const float h = ax <= 0.4f ? 2.0f - 4.0f * ax : (ax <= 1.0f ? 0.4f : 0.0f);
  const __m128 keep = _mm_castsi128_ps(_mm_set1_epi32(x > 0.0f ? -1 : 0));
  __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
  // lanes: all-ones where the lane's column is < k (masked blocks only; columns in [k, D) add exact zeros whatever
  // the row holds there)
  auto block = [&](int64_t j, __m128& a, __m128 lanes) {
    const __m128 gv = _mm_loadu_ps(g + j);
    __m128 wv = _mm_loadu_ps(w + j);
    if (o != nullptr) wv = _mm_sub_ps(wv, _mm_loadu_ps(o + j));
    a = _mm_add_ps(a, _mm_and_ps(_mm_mul_ps(gv, wv), lanes));
    _mm_storeu_ps(acc + j, _mm_add_ps(_mm_loadu_ps(acc + j), _mm_and_ps(gv, _mm_and_ps(lanes, keep))));
  };
  const __m128 all = _mm_castsi128_ps(_mm_set1_epi32(-1));
  int64_t j = 0;
  for (const int64_t k8 = k & ~int64_t(7); j < k8; j += 8) {  // whole 8-column blocks below k
    block(j, a0, all);
    block(j + 4, a1, all);
  }
  if (j < k) {  // the last k % 8 columns: one masked 8- or 4-column block inside the row, scalar past D & ~3
    if (j + 8 <= D) {
      block(j, a0, prefix_lanes(j, k));
      block(j + 4, a1, prefix_lanes(j + 4, k));
      j = k;
    } else if (j + 4 <= D) {
      block(j, a0, prefix_lanes(j, k));
      j = std::min(k, j + 4);
    }
  }
  float tail = 0.0f;
  for (; j < k; ++j) {  // only for D % 4 != 0: the last D % 4 columns
    tail += g[j] * (w[j] - (o != nullptr ? o[j] : 0.0f));
    if (x > 0.0f) acc[j] += g[j];
  }
  alignas(16) float part[4];
  _mm_store_ps(part, _mm_add_ps(a0, a1));
  const float s = ((part[0] + part[1]) + (part[2] + part[3])) + tail;
  return h == 0.0f ? 0.0f : s * h;
}
#endif

// One lookup's contribution: adds m * g[j] (j < k) into acc[0, k) and returns its STE scalar s * H(x) (0 without
// threshold). The norm term s * H(x) * dn/dw is NOT added here: dn/dw is a property of the row (sign(w), or w / n),
// so callers add (sum over the row's lookups of s * H) * dn/dw once per row (add_norm_term). D: the row length.
template <bool kThr, typename scalar_t, typename acc_t>
inline acc_t lookup_grad(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                         const scalar_t* __restrict__ oov_row, int64_t k, int64_t D, acc_t n, acc_t t,
                         acc_t* __restrict__ acc) {
  bool m = true;
  acc_t sh = 0;
  if constexpr (kThr) {
    const acc_t x = n - t;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (!std::isnan(x)) return lookup_grad_ste_f32(g, w, oov_row, k, D, x, acc);
    }
#endif
    m = x > acc_t(0);
    if (std::isnan(x)) {  // m = NaN: the direct term m * g is NaN on [0, k)
      for (int64_t j = 0; j < k; ++j) acc[j] += quiet_nan<acc_t>();
    }
    const acc_t h = step_ste_grad(x);  // NaN for NaN x, 0 for |x| > 1 (also +-inf: no STE term at all)
    if (h != acc_t(0)) {
      const acc_t s = dot_minus<scalar_t, acc_t>(g, w, oov_row, k);
      sh = s * h;
    }
  }
  if (m) {
    for (int64_t j = 0; j < k; ++j) acc[j] += static_cast<acc_t>(g[j]);
  }
  return sh;
}

// acc[j] += c * dn/dw[j] over the full row: sign(w) for p = 1, w / n for p = 2 (0 at n = 0; NaN for a NaN n).
// c == 0 (H = 0: |x| > 1, or x = +-inf) adds nothing, even for a row with inf entries.
template <int P, typename scalar_t, typename acc_t>
inline void add_norm_term(const scalar_t* __restrict__ w, int64_t D, acc_t c, acc_t n, acc_t* __restrict__ acc) {
  if (c == acc_t(0)) return;
  if constexpr (P == 1) {
    int64_t j = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      const __m128 cv = _mm_set1_ps(c), one = _mm_set1_ps(1.0f), zero = _mm_setzero_ps();
      for (; j + 4 <= D; j += 4) {
        const __m128 wv = _mm_loadu_ps(w + j);
        // sign(w) as sign_of: (w > 0) - (w < 0), so 0 for w == 0 and for NaN
        const __m128 sg = _mm_sub_ps(_mm_and_ps(_mm_cmpgt_ps(wv, zero), one), _mm_and_ps(_mm_cmplt_ps(wv, zero), one));
        _mm_storeu_ps(acc + j, _mm_add_ps(_mm_loadu_ps(acc + j), _mm_mul_ps(cv, sg)));
      }
    }
#endif
    for (; j < D; ++j) acc[j] += c * sign_of(static_cast<acc_t>(w[j]));
  } else {
    if (n == acc_t(0)) return;
    const acc_t cn = c / n;
    for (int64_t j = 0; j < D; ++j) acc[j] += cn * static_cast<acc_t>(w[j]);
  }
}


// Exact n / d for 0 <= n < 2^32 by a multiply-high with a 64-bit reciprocal (Lemire, Kaser, Kurz: "Faster
// remainder by direct computation", 2019); d = 1 is handled apart (its reciprocal 2^64 does not fit).
struct FastDiv {
  uint64_t M;
  uint32_t d;
  explicit FastDiv(uint32_t d_) : M(d_ > 1 ? UINT64_C(0xFFFFFFFFFFFFFFFF) / d_ + 1 : 0), d(d_) {}
  uint32_t div(uint32_t n) const {
    return d > 1 ? static_cast<uint32_t>((static_cast<unsigned __int128>(M) * n) >> 64) : n;
  }
};

struct BackwardPtrs {
  const void* g;
  const void* w;
  const void* idx;
  const void* norm;
  const void* thr;
  const int64_t* dims;
  const void* oov;
};

template <typename scalar_t, typename index_t, int P, bool kThr>
void backward_sparse_kernel(const Problem& pr, const BackwardPtrs& ptr, scalar_t* __restrict__ rows,
                            at::opmath_type<scalar_t>* __restrict__ sh_buf, std::atomic<int64_t>& bad_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(ptr.g);
  const auto* w = static_cast<const scalar_t*>(ptr.w);
  const auto* idx = static_cast<const index_t*>(ptr.idx);
  const auto* norm = static_cast<const acc_t*>(ptr.norm);
  const auto* thr = static_cast<const acc_t*>(ptr.thr);
  const auto* oov = static_cast<const scalar_t*>(ptr.oov);
  const int64_t F = pr.F, D = pr.D, N = pr.N;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = pr.B * F * row_bytes >= kStreamMinBytes;
  at::parallel_for(0, pr.B * F, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(D));
    for (int64_t q = begin; q < std::min(end, begin + kRowPrefetchDistance); ++q) {
      const int64_t r = static_cast<int64_t>(idx[q]);
      if (r >= 0 && r < N) prefetch_row(w + r * D, row_bytes, false);
    }
    int64_t f = begin % F, b = begin / F;  // (b, f) of pos, advanced without a division per lookup
    for (int64_t pos = begin; pos < end; ++pos, (f + 1 == F ? (f = 0, ++b) : ++f)) {
      if (pos + kRowPrefetchDistance < end) {
        const int64_t rn = static_cast<int64_t>(idx[pos + kRowPrefetchDistance]);
        if (rn >= 0 && rn < N) prefetch_row(w + rn * D, row_bytes, false);
      }
      const int64_t r = static_cast<int64_t>(idx[pos]);
      if (r < 0 || r >= N) {  // never touches the table; raised (first position) after the pass
        record_first_error(bad_index, pos);
        continue;
      }
      int64_t k = D;
      if (ptr.dims != nullptr) k = clamp_dims(ptr.dims[b * pr.dims_bstride + f], D);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const acc_t sh = lookup_grad<kThr>(g + pos * D, w + r * D, oov != nullptr ? oov + f * D : nullptr, k, D,
                                         norm[pos], kThr ? thr[f] : acc_t(0), acc.data());
      if constexpr (kThr) {
        sh_buf[pos] = sh;
        add_norm_term<P>(w + r * D, D, sh, norm[pos], acc.data());
      }
      store_row_stream(rows + pos * D, acc.data(), D, stream);
    }
    stream_fence();
  });
}

// Stable LSD radix sort of the lookup positions by table row (11-bit digits over ceil(log2 N) bits): O(B*F) per
// digit, independent of N. Validates every index on the way. On return keys[q] is the row of the q-th lookup in
// row order and order[q] its position; lookups of one row keep ascending position order.
template <typename index_t>
void sort_lookups_by_row(const index_t* __restrict__ idx, int64_t L, int64_t N, int64_t F,
                         std::vector<int64_t>& keys, std::vector<int32_t>& order) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  keys.resize(static_cast<size_t>(L));
  order.resize(static_cast<size_t>(L));
  for (int64_t pos = 0; pos < L; ++pos) {
    const int64_t r = static_cast<int64_t>(idx[pos]);
    if (r < 0 || r >= N) raise_bad_index(pos, F, r, N);
    keys[pos] = r;
    order[pos] = static_cast<int32_t>(pos);
  }
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < N) ++bits;
  std::vector<int64_t> keys_tmp(static_cast<size_t>(L));
  std::vector<int32_t> order_tmp(static_cast<size_t>(L));
  std::vector<int64_t> count(static_cast<size_t>(kBuckets));
  for (int shift = 0; shift < bits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t q = 0; q < L; ++q) ++count[(keys[q] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (int64_t d = 0; d < kBuckets; ++d) {
      const int64_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t q = 0; q < L; ++q) {
      const int64_t dst = count[(keys[q] >> shift) & (kBuckets - 1)]++;
      keys_tmp[dst] = keys[q];
      order_tmp[dst] = order[q];
    }
    keys.swap(keys_tmp);
    order.swap(order_tmp);
  }
}

// Dense: grad_weight arrives zero-filled (lazily, see zeros_lazy_cpu); the lookups are sorted by row and each
// touched row is summed (ascending lookup order) and written exactly once. Work is split over the sorted lookups,
// so a very frequent row does not unbalance the threads.
// `sink(r, acc, tmp)` receives each touched row r with its summed gradient acc (D entries, may be modified) and D
// scratch entries: the dense backward stores it into grad_weight[r], the fused update applies the optimizer to
// weight[r] in place (the row is read by its own lookups first, and no other thread touches it).
template <typename scalar_t, typename index_t, int P, bool kThr, typename Sink>
void backward_sorted_kernel(const Problem& pr, const BackwardPtrs& ptr, at::opmath_type<scalar_t>* __restrict__ sh_buf,
                            const void* prefetch_dst, Sink&& sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(ptr.g);
  const auto* w = static_cast<const scalar_t*>(ptr.w);
  const auto* idx = static_cast<const index_t*>(ptr.idx);
  const auto* norm = static_cast<const acc_t*>(ptr.norm);
  const auto* thr = static_cast<const acc_t*>(ptr.thr);
  const auto* oov = static_cast<const scalar_t*>(ptr.oov);
  const int64_t F = pr.F, D = pr.D, N = pr.N;
  const int64_t L = pr.B * F;

  std::vector<int64_t> keys;
  std::vector<int32_t> order;
  sort_lookups_by_row(idx, L, N, F, keys, order);

  const int64_t* key = keys.data();
  const int32_t* ord = order.data();
  const FastDiv fdiv(static_cast<uint32_t>(F));  // lookup position -> batch row without a division per lookup
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  // Prefetch for sorted lookup q: its grad_out row (random order), its table row and gradient row (ascending).
  auto prefetch_lookup = [&](int64_t q) {
    prefetch_row(g + static_cast<int64_t>(ord[q]) * D, row_bytes, false);
    if (q == 0 || key[q] != key[q - 1]) {
      prefetch_row(w + key[q] * D, row_bytes, false);
      if (prefetch_dst != nullptr) prefetch_row(static_cast<const scalar_t*>(prefetch_dst) + key[q] * D, row_bytes, true);
    }
  };
  // One lookup of the sorted order: adds its gradient into acc, returns its STE scalar (and records it).
  auto add_lookup = [&](int64_t q, const scalar_t* wr, acc_t* acc) -> acc_t {
    const int64_t pos = ord[q];
    const int64_t b = fdiv.div(static_cast<uint32_t>(pos));
    const int64_t f = pos - b * F;
    const int64_t k = ptr.dims != nullptr ? clamp_dims(ptr.dims[b * pr.dims_bstride + f], D) : D;
    const acc_t sh = lookup_grad<kThr>(g + pos * D, wr, oov != nullptr ? oov + f * D : nullptr, k, D, norm[pos],
                                       kThr ? thr[f] : acc_t(0), acc);
    if constexpr (kThr) sh_buf[pos] = sh;
    return sh;
  };

  // Hot rows: a run of at least kHotRun lookups of one row (e.g. a missing-value id) would keep one thread busy
  // while the others wait. Such runs are cut into segments of kHotSeg sorted lookups at fixed positions, summed in
  // parallel into partials, and the run's owner adds the partials in segment order: deterministic, and the same
  // result at any thread count.
  std::vector<int64_t> hot_start, hot_end, hot_seg0, seg_lo, seg_hi;
  for (int64_t q = 0; q < L;) {
    int64_t e = q + 1;
    while (e < L && key[e] == key[q]) ++e;
    if (e - q >= kHotRun) {
      hot_start.push_back(q);
      hot_end.push_back(e);
      hot_seg0.push_back(static_cast<int64_t>(seg_lo.size()));
      for (int64_t s0 = q; s0 < e; s0 += kHotSeg) {
        seg_lo.push_back(s0);
        seg_hi.push_back(std::min(e, s0 + kHotSeg));
      }
    }
    q = e;
  }
  const int64_t n_seg = static_cast<int64_t>(seg_lo.size());
  std::vector<acc_t> seg_acc(static_cast<size_t>(n_seg * D)), seg_sh(static_cast<size_t>(n_seg));
  if (n_seg > 0) {
    at::parallel_for(0, n_seg, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t sg = s0; sg < s1; ++sg) {
        acc_t* acc = seg_acc.data() + sg * D;
        std::fill(acc, acc + D, acc_t(0));
        const scalar_t* wr = w + key[seg_lo[sg]] * D;
        acc_t sh_sum = 0;
        for (int64_t q = seg_lo[sg]; q < seg_hi[sg]; ++q) {
          if (q + kRowPrefetchDistance < seg_hi[sg]) {
            prefetch_row(g + static_cast<int64_t>(ord[q + kRowPrefetchDistance]) * D, row_bytes, false);
          }
          sh_sum += add_lookup(q, wr, acc);
        }
        seg_sh[sg] = sh_sum;
      }
    });
  }

  at::parallel_for(0, L, grain_for(D), [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> acc(static_cast<size_t>(D)), tmp(static_cast<size_t>(D));
    // this chunk owns the rows whose first sorted lookup lies in [q0, q1)
    int64_t q = q0;
    while (q > 0 && q < q1 && key[q] == key[q - 1]) ++q;
    for (int64_t p = q; p < std::min(L, q + kRowPrefetchDistance); ++p) prefetch_lookup(p);
    while (q < q1) {
      const int64_t r = key[q];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* wr = w + r * D;
      acc_t sh_sum = 0;  // sum of s * H over the row's lookups (every lookup of a row has the same norm)
      const acc_t n = norm[ord[q]];
      const auto hot = n_seg > 0 ? std::lower_bound(hot_start.begin(), hot_start.end(), q) : hot_start.end();
      if (hot != hot_start.end() && *hot == q) {  // a split run: its partials, in segment order
        const size_t h = static_cast<size_t>(hot - hot_start.begin());
        for (int64_t sg = hot_seg0[h]; sg < n_seg && seg_lo[sg] < hot_end[h]; ++sg) {
          const acc_t* part = seg_acc.data() + sg * D;
          for (int64_t j = 0; j < D; ++j) acc[j] += part[j];
          sh_sum += seg_sh[sg];
        }
        q = hot_end[h];
        if (q < L) prefetch_lookup(q);
      } else {
        for (; q < L && key[q] == r; ++q) {
          if (q + kRowPrefetchDistance < L) prefetch_lookup(q + kRowPrefetchDistance);
          sh_sum += add_lookup(q, wr, acc.data());
        }
      }
      if constexpr (kThr) add_norm_term<P>(wr, D, sh_sum, n, acc.data());
      sink(r, acc.data(), tmp.data());
    }
  });
}

template <typename scalar_t, typename index_t, int P, bool kThr>
void backward_dense_kernel(const Problem& pr, const BackwardPtrs& ptr, scalar_t* __restrict__ gw,
                           at::opmath_type<scalar_t>* __restrict__ sh_buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = pr.D;
  backward_sorted_kernel<scalar_t, index_t, P, kThr>(pr, ptr, sh_buf, gw, [&](int64_t r, acc_t* acc, acc_t*) {
    store_row(gw + r * D, acc, D);
  });
}

// Fused backward + optimizer: as the dense backward, but each touched row's summed gradient updates the row (and its
// optimizer state) in place instead of being stored; no (N, D) or (B*F, D) gradient exists at any point.
template <typename scalar_t, typename index_t, int P, bool kThr, RowOptimizer kOpt>
void backward_update_kernel(const Problem& pr, const BackwardPtrs& ptr, scalar_t* __restrict__ w,
                            at::opmath_type<scalar_t>* __restrict__ s1, at::opmath_type<scalar_t>* __restrict__ s2,
                            const RowUpdateParams<at::opmath_type<scalar_t>>& hp,
                            at::opmath_type<scalar_t>* __restrict__ sh_buf, int64_t* __restrict__ last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = pr.D;
  backward_sorted_kernel<scalar_t, index_t, P, kThr>(pr, ptr, sh_buf, nullptr, [&](int64_t r, acc_t* acc, acc_t* tmp) {
    if constexpr (kOpt == RowOptimizer::kAdagrad) prefetch_row(s1 + r, 1, true);
    apply_row_update<kOpt>(w + r * D, acc, r, D, s1, s2, tmp, hp, last);
  });
}

// grad_threshold[f] = -sum_b sh[b, f];  grad_oov[f, j] = sum_b (1 - m[b, f]) g[b, f, j] [j < k]   (ascending b)
template <typename scalar_t>
void field_reduce_kernel(const Problem& pr, const BackwardPtrs& ptr, const at::opmath_type<scalar_t>* sh_buf,
                         at::opmath_type<scalar_t>* grad_t, scalar_t* grad_oov) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(ptr.g);
  const auto* norm = static_cast<const acc_t*>(ptr.norm);
  const auto* thr = static_cast<const acc_t*>(ptr.thr);
  const int64_t B = pr.B, F = pr.F, D = pr.D;
  at::parallel_for(0, F, 1, [&](int64_t f0, int64_t f1) {
    std::vector<acc_t> acc(static_cast<size_t>(D));
    if (grad_t != nullptr) {  // b outer: sh_buf is read in memory order (each field still sums in ascending b)
      std::vector<acc_t> sum(static_cast<size_t>(f1 - f0), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const acc_t* sh_b = sh_buf + b * F;
        for (int64_t f = f0; f < f1; ++f) sum[f - f0] += sh_b[f];
      }
      for (int64_t f = f0; f < f1; ++f) grad_t[f] = -sum[f - f0];
    }
    for (int64_t f = f0; f < f1; ++f) {
      if (grad_oov != nullptr) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (thr != nullptr) {  // without threshold every lookup is kept: grad_oov stays 0
          for (int64_t b = 0; b < B; ++b) {
            const int64_t pos = b * F + f;
            const acc_t x = norm[pos] - thr[f];
            if (x > acc_t(0)) continue;
            const int64_t k = ptr.dims != nullptr ? clamp_dims(ptr.dims[b * pr.dims_bstride + f], D) : D;
            const scalar_t* gr = g + pos * D;
            if (std::isnan(x)) {  // 1 - m = NaN
              for (int64_t j = 0; j < k; ++j) acc[j] += quiet_nan<acc_t>();
            } else {
              for (int64_t j = 0; j < k; ++j) acc[j] += static_cast<acc_t>(gr[j]);
            }
          }
        }
        store_row(grad_oov + f * D, acc.data(), D);
      }
    }
  });
}

template <typename S, typename I, int P, bool T>
struct KernelTag {
  using scalar_t = S;
  using index_t = I;
  static constexpr int kP = P;
  static constexpr bool kThr = T;
};

// What the plain backward and the fused update share: the pointers, the dispatch on (dtype, index type, p,
// threshold) for the row pass `rows(ptr, sh_ptr, KernelTag<...>{})`, then the per-field reduction into
// grad_threshold (gt_acc) / grad_oov, which reads only grad_out, the norms and the per-lookup STE scalars.
template <typename Rows>
void run_backward(const Problem& pr, const Tensor& g, const Tensor& w, const Tensor& idx, const Tensor& nrm,
                  const Tensor& thr, const Tensor& d, const Tensor& oov, const Tensor& sh, const Tensor& gt_acc,
                  const Tensor& grad_oov, int64_t p, Rows&& rows) {
  OPTEMBED_DISPATCH_FLOATING(w.scalar_type(), "masked_embedding_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardPtrs ptr{g.const_data_ptr(),
                           w.const_data_ptr(),
                           idx.const_data_ptr(),
                           nrm.const_data_ptr(),
                           thr.defined() ? thr.const_data_ptr() : nullptr,
                           d.defined() ? d.const_data_ptr<int64_t>() : nullptr,
                           oov.defined() ? oov.const_data_ptr() : nullptr};
    acc_t* sh_ptr = sh.defined() ? sh.mutable_data_ptr<acc_t>() : nullptr;
    OPTEMBED_DISPATCH_INDEX(idx.scalar_type(), "indices", [&] {
      OPTEMBED_P_SWITCH(p, kP, [&] {
        OPTEMBED_BOOL_SWITCH(thr.defined(), kThr, [&] {
          rows(ptr, sh_ptr, KernelTag<scalar_t, index_t, kP, kThr>{});
        });
      });
    });
    if (thr.defined() || oov.defined()) {
      field_reduce_kernel<scalar_t>(pr, ptr, sh_ptr, gt_acc.defined() ? gt_acc.mutable_data_ptr<acc_t>() : nullptr,
                                    oov.defined() ? grad_oov.mutable_data_ptr<scalar_t>() : nullptr);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> masked_embedding_backward_cpu(
    const Tensor& grad_out, const Tensor& weight, const Tensor& indices, const Tensor& norm,
    const std::optional<Tensor>& threshold, const std::optional<Tensor>& dims, int64_t p,
    const std::optional<Tensor>& oov_weight, bool deterministic, bool sparse) {
  (void)deterministic;  // the CPU backward is always deterministic (see the design comment)
  const char* op = "masked_embedding_backward";
  const Problem pr = check_common(weight, indices, threshold, dims, p, oov_weight, op);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pr.B && grad_out.size(1) == pr.F &&
                  grad_out.size(2) == pr.D,
              op, ": grad_out must have shape (B, F, D) = (", pr.B, ", ", pr.F, ", ", pr.D, "), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " must match weight dtype ", weight.scalar_type());
  OPTEMBED_CHECK_SAME_DEVICE(grad_out, weight, "grad_out", "weight");
  const at::ScalarType acc = norm_dtype_for(weight.scalar_type());
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == pr.B && norm.size(1) == pr.F, op,
              ": norm must have shape (B, F) = (", pr.B, ", ", pr.F, "), got ", norm.sizes());
  OPTEMBED_CHECK_SAME_DEVICE(norm, weight, "norm", "weight");
  const int64_t L = pr.B * pr.F;
  TORCH_CHECK(L < std::numeric_limits<int32_t>::max(), op, ": B * F = ", L, " lookups exceed the int32 range");

  bool lazy_zero = false;
  Tensor grad_weight = sparse ? at::empty({L, pr.D}, weight.options())
                              : zeros_lazy_cpu({pr.N, pr.D}, weight.options(), &lazy_zero);
  Tensor grad_t = threshold.has_value() ? at::empty({pr.F}, threshold->options()) : at::empty({0}, weight.options());
  Tensor grad_oov = oov_weight.has_value() ? at::empty({pr.F, pr.D}, weight.options()) : at::empty({0}, weight.options());
  if (L == 0) {
    grad_t.zero_();
    grad_oov.zero_();
    return {grad_weight, grad_t, grad_oov};
  }

  const Tensor g = grad_out.contiguous();
  const Tensor w = weight.contiguous();
  const Tensor idx = indices.contiguous();
  const Tensor nrm = norm.to(acc).contiguous();
  const Tensor thr = prepare_threshold(threshold, acc, op, /*check_nan=*/false);  // the forward checked
  const Tensor d = prepare_dims(dims);
  const Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : Tensor();
  std::atomic<int64_t> bad_index{kNoErrorPos};
  const Tensor sh = thr.defined() ? at::empty({L}, weight.options().dtype(acc)) : Tensor();
  const Tensor gt_acc = thr.defined() ? at::empty({pr.F}, weight.options().dtype(acc)) : Tensor();

  run_backward(pr, g, w, idx, nrm, thr, d, oov, sh, gt_acc, grad_oov, p, [&](const BackwardPtrs& ptr, auto* sh_ptr,
                                                                              auto tag) {
    using T = decltype(tag);
    using scalar_t = typename T::scalar_t;
    using index_t = typename T::index_t;
    if (sparse) {
      backward_sparse_kernel<scalar_t, index_t, T::kP, T::kThr>(pr, ptr, grad_weight.mutable_data_ptr<scalar_t>(),
                                                                 sh_ptr, bad_index);
    } else {
      backward_dense_kernel<scalar_t, index_t, T::kP, T::kThr>(pr, ptr, grad_weight.mutable_data_ptr<scalar_t>(),
                                                                sh_ptr);
    }
  });
  // (the field reduction in run_backward never reads the table, so it is safe before the error)
  if (const int64_t pos = bad_index.load(); pos != kNoErrorPos) {
    const int64_t r = idx.scalar_type() == at::kInt ? idx.const_data_ptr<int32_t>()[pos]
                                                    : idx.const_data_ptr<int64_t>()[pos];
    raise_bad_index(pos, pr.F, r, pr.N);
  }
  if (thr.defined()) {
    grad_t.copy_(gt_acc);
  }
  return {grad_weight, grad_t, grad_oov};
}

// Fused backward + optimizer step (masked_embedding_backward_update): the gradient of `weight` is never formed; each
// touched row is updated in place once (sorted by row, summed in ascending lookup order: deterministic at any thread
// count) with sparse_row_update's rules (csrc/row_update.h). Returns (grad_threshold, grad_oov) as the backward.
// Invalid ids raise IndexError before anything is written.
std::tuple<Tensor, Tensor> masked_embedding_backward_update_cpu(
    const Tensor& grad_out, Tensor weight, const Tensor& indices, const Tensor& norm,
    const std::optional<Tensor>& threshold, const std::optional<Tensor>& dims, int64_t p,
    const std::optional<Tensor>& oov_weight, std::optional<Tensor> state1, std::optional<Tensor> state2,
    c10::string_view optimizer_sv, double lr, double eps, double beta1, double beta2, double weight_decay,
    int64_t step, std::optional<Tensor> last_step) {
  const char* op = "masked_embedding_backward_update";
  const Problem pr = check_common(weight, indices, threshold, dims, p, oov_weight, op);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (it is updated in place)");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pr.B && grad_out.size(1) == pr.F &&
                  grad_out.size(2) == pr.D,
              op, ": grad_out must have shape (B, F, D) = (", pr.B, ", ", pr.F, ", ", pr.D, "), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " must match weight dtype ", weight.scalar_type());
  OPTEMBED_CHECK_SAME_DEVICE(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == pr.B && norm.size(1) == pr.F, op,
              ": norm must have shape (B, F) = (", pr.B, ", ", pr.F, "), got ", norm.sizes());
  OPTEMBED_CHECK_SAME_DEVICE(norm, weight, "norm", "weight");
  const std::string optimizer(optimizer_sv.data(), optimizer_sv.size());
  const Tensor g = grad_out.contiguous();
  // the optimizer name, state shapes / dtypes and hyper-parameters follow sparse_row_update's rules
  sparse_row_update_check(weight, indices.reshape({-1}), g.view({-1, pr.D}), state1, state2, optimizer, lr, eps,
                          beta1, beta2, weight_decay, step);
  check_last_step(last_step, weight, step, op);
  int64_t* last = (last_step.has_value() && last_step->defined()) ? last_step->mutable_data_ptr<int64_t>() : nullptr;
  const RowOptimizer opt = parse_optimizer(optimizer);
  const int64_t L = pr.B * pr.F;
  TORCH_CHECK(L < std::numeric_limits<int32_t>::max(), op, ": B * F = ", L, " lookups exceed the int32 range");
  const at::ScalarType acc = norm_dtype_for(weight.scalar_type());
  Tensor grad_t = threshold.has_value() ? at::empty({pr.F}, threshold->options()) : at::empty({0}, weight.options());
  Tensor grad_oov = oov_weight.has_value() ? at::zeros({pr.F, pr.D}, weight.options()) : at::empty({0}, weight.options());
  if (L == 0) {
    grad_t.zero_();
    return {grad_t, grad_oov};
  }
  const Tensor idx = indices.contiguous();
  const Tensor nrm = norm.to(acc).contiguous();
  const Tensor thr = prepare_threshold(threshold, acc, op, /*check_nan=*/false);
  const Tensor d = prepare_dims(dims);
  const Tensor oov = oov_weight.has_value() ? oov_weight->contiguous() : Tensor();
  const Tensor sh = thr.defined() ? at::empty({L}, weight.options().dtype(acc)) : Tensor();
  const Tensor gt_acc = thr.defined() ? at::empty({pr.F}, weight.options().dtype(acc)) : Tensor();

  run_backward(pr, g, weight, idx, nrm, thr, d, oov, sh, gt_acc, grad_oov, p, [&](const BackwardPtrs& ptr,
                                                                                   auto* sh_ptr, auto tag) {
    using T = decltype(tag);
    using scalar_t = typename T::scalar_t;
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* s1 = (state1.has_value() && state1->defined()) ? state1->mutable_data_ptr<acc_t>() : nullptr;
    acc_t* s2 = (state2.has_value() && state2->defined()) ? state2->mutable_data_ptr<acc_t>() : nullptr;
    const RowUpdateParams<acc_t> hp(opt, lr, eps, beta1, beta2, weight_decay, step);
    OPTEMBED_ROW_OPTIMIZER_SWITCH(opt, kOpt, [&] {
      backward_update_kernel<scalar_t, typename T::index_t, T::kP, T::kThr, kOpt>(
          pr, ptr, weight.mutable_data_ptr<scalar_t>(), s1, s2, hp, sh_ptr, last);
    });
  });
  if (thr.defined()) grad_t.copy_(gt_acc);
  return {grad_t, grad_oov};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optembed, m) {
  m.def(
      "masked_embedding_forward(Tensor weight, Tensor indices, Tensor? threshold, Tensor? dims, int p, "
      "Tensor? oov_weight, bool check_indices) -> (Tensor out, Tensor norm)");
  m.def(
      "masked_embedding_backward(Tensor grad_out, Tensor weight, Tensor indices, Tensor norm, Tensor? threshold, "
      "Tensor? dims, int p, Tensor? oov_weight, bool deterministic, bool sparse) "
      "-> (Tensor grad_weight, Tensor grad_threshold, Tensor grad_oov)");
  // The backward with the optimizer step fused in: updates weight (and state1 / state2, and last_step for lazy
  // weight decay) in place with sparse_row_update's rules instead of returning its gradient.
  m.def(
      "masked_embedding_backward_update(Tensor grad_out, Tensor(a!) weight, Tensor indices, Tensor norm, "
      "Tensor? threshold, Tensor? dims, int p, Tensor? oov_weight, Tensor(b!)? state1, Tensor(c!)? state2, "
      "str optimizer, float lr, float eps, float beta1, float beta2, float weight_decay, int step, "
      "Tensor(d!)? last_step=None) -> (Tensor grad_threshold, Tensor grad_oov)");
}

TORCH_LIBRARY_IMPL(optembed, CPU, m) {
  m.impl("masked_embedding_forward", &masked_embedding_forward_cpu);
  m.impl("masked_embedding_backward", &masked_embedding_backward_cpu);
  m.impl("masked_embedding_backward_update", &masked_embedding_backward_update_cpu);
}

}  // namespace optembed
