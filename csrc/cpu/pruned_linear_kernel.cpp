// fasttrack::pruned_linear / fasttrack::_pruned_linear_gather, CPU kernel (schema and argument
// checks: csrc/pruned_linear.cpp).
//
// CPU kernel, two phases:
//  1. one pass over x, parallel over rows: (LayerNorm statistics over all d_in, two-pass in the
//     accumulation type while the row is in L1, then) gather the kept columns — normalised and
//     affine-transformed when fused — into a contiguous [M, d_kept] buffer of x's dtype;
//  2. one GEMM on that buffer, the bias fused in. float32: oneDNN on a weight reordered into its
//     blocked layout on every call (measured 1.6 ms vs 3.0 ms for at::linear at M=320, 540->768, one
//     thread: the reorder of a [768, 540] weight costs less than at::linear's fp32 path loses);
//     other dtypes: at::linear (for bf16 the reorder does not pay for itself per call).
// Phase 1 alone is also exposed as `_pruned_linear_gather`: `fasttrack.nn.PrunedLinear` runs it and
// then its own cached oneDNN pre-packed weight, which the op cannot keep (its weight is an argument).
// Index validation (range, duplicates) runs before anything is read through `in_index`.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "fasttrack/cpu_isa.h"  // FT_HAVE_AVX2_PATH, kHasAvx2
#include "fasttrack/cpu_simd.h"
#include "fasttrack/output_cache.h"
#include "fasttrack/pruned_linear.h"

namespace fasttrack {
namespace pruned_linear {
namespace {

constexpr int64_t kGrainElems = 16 * 1024;  // x elements per task: below this a thread switch costs more

// A LayerNorm affine vector in acc_t at the dims idx[0..k), or at all k dims when idx is null.
template <typename acc_t>
std::vector<acc_t> gathered_affine(const std::optional<at::Tensor>& t, const int64_t* idx, int64_t k, acc_t dflt) {
  std::vector<acc_t> out(k, dflt);
  if (!t.has_value()) return out;
  const at::Tensor v = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = v.const_data_ptr<acc_t>();
  for (const auto j : c10::irange(k)) out[j] = p[idx ? idx[j] : j];
  return out;
}

// Sum of f(row[c]) over a row: kLanes independent partial sums over contiguous rows so the compiler
// vectorises the loop (one serial accumulator is latency-bound: it made the fused LayerNorm slower
// than eager's); the stride-sc tail / strided rows run serially.
constexpr int kLanes = 16;

template <typename acc_t, typename T, typename F>
acc_t row_sum(const T* row, int64_t n, int64_t sc, F f) {
  acc_t part[kLanes] = {};
  int64_t c = 0;
  if (sc == 1) {
    for (; c + kLanes <= n; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) part[l] += f(static_cast<acc_t>(row[c + l]));
    }
  }
  acc_t sum = 0;
  for (; c < n; ++c) sum += f(static_cast<acc_t>(row[c * sc]));
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// Widen a row to the accumulation type. bf16 -> fp32 is a 16-bit shift, written on the bits so the
// loop vectorises (c10::BFloat16's conversion does not).
template <typename T, typename acc_t>
void widen(const T* src, int64_t n, int64_t sc, acc_t* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (sc == 1) {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
      uint32_t* out = reinterpret_cast<uint32_t*>(dst);
      for (int64_t c = 0; c < n; ++c) out[c] = static_cast<uint32_t>(bits[c]) << 16;
      return;
    }
  }
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c * sc]);
}

// Narrow fp32 -> T. fp32 -> bf16 is rounded to nearest even on the bits (NaN stays NaN), as
// c10::BFloat16 does, but in a loop that vectorises.
template <typename T, typename acc_t>
void narrow(const acc_t* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(src);
    uint16_t* out = reinterpret_cast<uint16_t*>(dst);
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t b = bits[j];
      const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
      out[j] = static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// x2: [M, d_in] with any strides; out: contiguous [M, k].
#if defined(FT_HAVE_AVX2_PATH)
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Sorted kept dims as a left-pack plan over 8-dim blocks of a row: block b holds `count[b]` kept
// dims, which `perm[b]` moves to the low lanes, and they land at `start[b]` in the gathered row.
// Writing 8 lanes at a time, each block's stray high lanes are overwritten by the next block's.
// It needs in_index ascending (the kept order is the dims' order), which is how every pruning
// utility here stores it; other orders take the per-element path.
struct PackPlan {
  int64_t blocks = 0;  // full 8-dim blocks of d_in
  std::vector<int32_t> perm, count, start;
  std::vector<int64_t> tail_out;  // for the d_in % 8 last dims: their output column or -1
};

inline bool ascending(const int64_t* idx, int64_t k) {
  for (int64_t j = 1; j < k; ++j) {
    if (idx[j] <= idx[j - 1]) return false;
  }
  return true;
}

inline PackPlan pack_plan(const int64_t* idx, int64_t k, int64_t d_in) {
  PackPlan p;
  p.blocks = d_in / 8;
  p.perm.assign(p.blocks * 8, 0);
  p.count.assign(p.blocks, 0);
  p.start.assign(p.blocks, 0);
  p.tail_out.assign(d_in - p.blocks * 8, -1);
  int64_t j = 0;
  for (int64_t b = 0; b < p.blocks; ++b) {
    p.start[b] = static_cast<int32_t>(j);
    for (; j < k && idx[j] < 8 * (b + 1); ++j) p.perm[8 * b + p.count[b]++] = static_cast<int32_t>(idx[j] - 8 * b);
  }
  for (; j < k; ++j) p.tail_out[idx[j] - 8 * p.blocks] = j;
  return p;
}

__attribute__((target("avx2,fma"))) inline __m256 load_f32x8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load_f32x8(const c10::BFloat16* p) {
  return simd::load_bf16x8(reinterpret_cast<const uint16_t*>(p));
}

// One contiguous row: (LayerNorm with fp32 statistics, two passes in 8 lanes x 4 accumulators,
// then) the kept dims by the pack plan. gamma/beta are over all d_in dims (the affine is applied
// before packing). Without normalize the lanes are moved as bits, so the copy is exact.
// Measured for a 768 -> 540 row here: 130 ns per row for gathering with 8 scalar loads, 260 with
// vgatherdps, 360 for the baseline x86-64 scalar loop; the pack plan needs none of those loads.
template <typename T, bool kNorm>
__attribute__((target("avx2,fma"))) void pack_row_avx2(const T* row, int64_t d_in, const PackPlan& plan, int64_t k,
                                                       const float* gamma, const float* beta, float eps, T* o) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  __m256 mv = _mm256_setzero_ps(), rv = mv;
  float mean = 0.f, rstd = 1.f;
  if constexpr (kNorm) {
    const int64_t d8 = plan.blocks * 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t c = 0;
    for (; c + 16 <= d8; c += 16) {
      a0 = _mm256_add_ps(a0, load_f32x8(row + c));
      a1 = _mm256_add_ps(a1, load_f32x8(row + c + 8));
    }
    if (c < d8) a0 = _mm256_add_ps(a0, load_f32x8(row + c));
    float sum = hsum(_mm256_add_ps(a0, a1));
    for (c = d8; c < d_in; ++c) sum += static_cast<float>(row[c]);
    mean = sum / static_cast<float>(d_in);
    mv = _mm256_set1_ps(mean);
    a0 = a1 = _mm256_setzero_ps();
    for (c = 0; c + 16 <= d8; c += 16) {
      const __m256 d0 = _mm256_sub_ps(load_f32x8(row + c), mv), d1 = _mm256_sub_ps(load_f32x8(row + c + 8), mv);
      a0 = _mm256_fmadd_ps(d0, d0, a0);
      a1 = _mm256_fmadd_ps(d1, d1, a1);
    }
    if (c < d8) {
      const __m256 d0 = _mm256_sub_ps(load_f32x8(row + c), mv);
      a0 = _mm256_fmadd_ps(d0, d0, a0);
    }
    float sq = hsum(_mm256_add_ps(a0, a1));
    for (c = d8; c < d_in; ++c) sq += (static_cast<float>(row[c]) - mean) * (static_cast<float>(row[c]) - mean);
    rstd = 1.f / std::sqrt(sq / static_cast<float>(d_in) + eps);
    rv = _mm256_set1_ps(rstd);
  }
  alignas(32) T spill[8];
  for (int64_t b = 0; b < plan.blocks; ++b) {
    const int32_t n = plan.count[b];
    if (n == 0) continue;
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.perm.data() + 8 * b));
    const int64_t pos = plan.start[b];
    T* dst = pos + 8 <= k ? o + pos : spill;  // the last blocks may not have 8 lanes of room
    if constexpr (kNorm) {
      __m256 h = _mm256_mul_ps(_mm256_sub_ps(load_f32x8(row + 8 * b), mv), rv);
      h = _mm256_permutevar8x32_ps(_mm256_fmadd_ps(h, _mm256_loadu_ps(gamma + 8 * b), _mm256_loadu_ps(beta + 8 * b)),
                                   perm);
      if constexpr (kF32) {
        _mm256_storeu_ps(dst, h);
      } else {
        simd::store_bf16x8(reinterpret_cast<uint16_t*>(dst), h);
      }
    } else if constexpr (kF32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(v, perm));
    } else {
      const __m256i w = _mm256_permutevar8x32_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * b))), perm);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0b1000);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
    }
    if (dst == spill) std::copy(spill, spill + n, o + pos);
  }
  for (int64_t t = 0; t < static_cast<int64_t>(plan.tail_out.size()); ++t) {
    const int64_t j = plan.tail_out[t], c = 8 * plan.blocks + t;
    if (j < 0) continue;
    o[j] = kNorm ? static_cast<T>((static_cast<float>(row[c]) - mean) * rstd * gamma[c] + beta[c]) : row[c];
  }
}
#endif

template <typename T, typename acc_t>
void gather_rows(const at::Tensor& x2, const int64_t* idx, int64_t k, bool normalize, double eps,
                 const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, T* out) {
  const int64_t M = x2.size(0), d_in = x2.size(1);
  const int64_t sm = x2.stride(0), sc = x2.stride(1);
  const T* x = x2.const_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, d_in));
#if defined(FT_HAVE_AVX2_PATH)
  if constexpr ((std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) && std::is_same_v<acc_t, float>) {
    if (sc == 1 && kHasAvx2 && ascending(idx, k)) {
      const PackPlan plan = pack_plan(idx, k, d_in);
      const auto gamma = gathered_affine<float>(normalize ? ln_weight : std::nullopt, nullptr, d_in, 1.f);
      const auto beta = gathered_affine<float>(normalize ? ln_bias : std::nullopt, nullptr, d_in, 0.f);
      at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          if (normalize) {
            pack_row_avx2<T, true>(x + m * sm, d_in, plan, k, gamma.data(), beta.data(), static_cast<float>(eps),
                                   out + m * k);
          } else {
            pack_row_avx2<T, false>(x + m * sm, d_in, plan, k, nullptr, nullptr, 0.f, out + m * k);
          }
        }
      });
      return;
    }
  }
#endif
  const auto gamma = gathered_affine<acc_t>(ln_weight, idx, k, acc_t(1));
  const auto beta = gathered_affine<acc_t>(ln_bias, idx, k, acc_t(0));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(normalize ? d_in : 0);  // the row, widened: read three times below
    std::vector<acc_t> h(normalize ? k : 0);       // its normalised kept dims, before narrowing
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * sm;
      T* o = out + m * k;
      if (!normalize) {
        if (sc == 1) {
          for (int64_t j = 0; j < k; ++j) o[j] = row[idx[j]];
        } else {
          for (int64_t j = 0; j < k; ++j) o[j] = row[idx[j] * sc];
        }
        continue;
      }
      widen(row, d_in, sc, buf.data());
      const acc_t* r = buf.data();
      // two-pass statistics: as accurate as the reference's, and the row is in L1 for the 2nd pass
      const acc_t mean = row_sum<acc_t>(r, d_in, 1, [](acc_t v) { return v; }) / static_cast<acc_t>(d_in);
      const acc_t sq = row_sum<acc_t>(r, d_in, 1, [mean](acc_t v) { return (v - mean) * (v - mean); });
      const acc_t rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(d_in) + static_cast<acc_t>(eps));
      for (int64_t j = 0; j < k; ++j) h[j] = (r[idx[j]] - mean) * rstd * gamma[j] + beta[j];
      narrow(h.data(), k, o);
    }
  });
}

// oneDNN linear with a per-call weight reorder (float32; see the top of the file).
at::Tensor onednn_linear(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto reorder = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                  .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  static const auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const at::Tensor packed = reorder.call(weight.contiguous(), h.size(0));
  return linear.call(h, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

bool use_onednn(const at::Tensor& h) {
  return h.scalar_type() == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && h.size(0) > 0 &&
         h.size(1) > 0;
}

// Phase 1: [..., d_in] -> [M, d_kept] contiguous, x's dtype (M = prod of the leading dims).
at::Tensor gather_impl(const char* op, const at::Tensor& x, const at::Tensor& in_index_in,
                       const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps,
                       bool normalize) {
  check_gather_args(op, x, in_index_in, ln_weight, ln_bias, normalize);
  const int64_t d_in = x.size(-1), k = in_index_in.size(0);
  const at::Tensor in_index = in_index_in.contiguous();
  const int64_t* idx = in_index.const_data_ptr<int64_t>();
  check_index_values(op, idx, k, d_in);
  // a view unless x's leading dims cannot be merged (M counted, not -1: d_in may be 0)
  const at::Tensor x2 =
      x.reshape({x.numel() == 0 ? c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)) : x.numel() / d_in, d_in});
  at::Tensor out = empty_output({x2.size(0), k}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pruned_linear_gather", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gather_rows<scalar_t, acc_t>(x2, idx, k, normalize, eps, ln_weight, ln_bias, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

at::Tensor gather_cpu(const at::Tensor& x, const at::Tensor& in_index, const std::optional<at::Tensor>& ln_weight,
                      const std::optional<at::Tensor>& ln_bias, double eps, bool normalize) {
  return gather_impl("_pruned_linear_gather", x, in_index, ln_weight, ln_bias, eps, normalize);
}

at::Tensor pruned_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& in_index, const std::optional<at::Tensor>& ln_weight,
                             const std::optional<at::Tensor>& ln_bias, double eps, bool normalize) {
  check_weight_args(x, weight, bias, in_index);
  const at::Tensor h = gather_impl("pruned_linear", x, in_index, ln_weight, ln_bias, eps, normalize);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  // oneDNN refuses empty products: d_out = 0 (or no rows) is an empty result, k = 0 the bias alone
  const at::Tensor out =
      use_onednn(h) && weight.size(0) > 0 ? onednn_linear(h, weight, bias) : at::linear(h, weight, bias);
  return out.view(shape);
}

}  // namespace pruned_linear
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) {
  m.impl("pruned_linear", &fasttrack::pruned_linear::pruned_linear_cpu);
  m.impl("_pruned_linear_gather", &fasttrack::pruned_linear::gather_cpu);
}
