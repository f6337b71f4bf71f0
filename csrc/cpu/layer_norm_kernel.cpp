// fasttrack::_layer_norm, CPU kernel (schema and argument checks: csrc/layer_norm.cpp).
//
// Contract: fasttrack/reference.py::layer_norm — normalise over the last dim in float32 (float64 for
// float64), y = (x - mean) / sqrt(var + eps) · weight + bias, biased variance, rounded once to x's
// dtype. Vectorised path (AVX-512; bf16 also needs AVX512_BF16 for its round-to-nearest-even store),
// float32 / bfloat16 x, any width: one row at a time in three passes over the row while it sits in
// L1 (sum; sum of squared deviations; scale and shift), the affine parameters read as float32.
// nn.LayerNorm vs this (through fasttrack.nn.vit.norm_forward), interleaved medians on one Zen 4
// core: 320 x 768 bf16 112.9 vs 58.8 µs, fp32 79.5 vs 48.0; 153 x 768 bf16 56.6 vs 31.5, fp32 42.7
// vs 26.7 (ATen reads bf16 through its AVX2 kernel here). Every other input (float16 / float64, a
// CPU without those features or ATEN_CPU_CAPABILITY below avx512) runs
// at::layer_norm, which computes the same formula.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include <fasttrack/cpu_isa.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/layer_norm.h>
#include <fasttrack/output_cache.h>

namespace fasttrack {
namespace layer_norm {
namespace {

// ATen's kernel: directly where it takes these dtypes (parameters of x's dtype, or float32 ones for
// bf16 / fp16 x: it computes in float32 either way, and bf16 / fp16 -> float32 is exact), so this is
// what nn.LayerNorm computes; other mixes in the accumulation dtype, as the spec.
at::Tensor composite(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps) {
  const auto dt = x.scalar_type();
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  // the parameters' one dtype (x's when there are none); ATen needs x's, or float32 for bf16 / fp16 x
  const auto pt = has_w ? weight->scalar_type() : has_b ? bias->scalar_type() : dt;
  const bool one_dtype = !(has_w && has_b) || weight->scalar_type() == bias->scalar_type();
  if (one_dtype && (pt == dt || (pt == at::kFloat && (dt == at::kBFloat16 || dt == at::kHalf)))) {
    return at::layer_norm(x, {x.size(-1)}, weight, bias, eps, /*cudnn_enable=*/false);
  }
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto to_acc = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return t->to(acc);
  };
  return at::layer_norm(x.to(acc), {x.size(-1)}, to_acc(weight), to_acc(bias), eps, false).to(dt);
}

#if defined(FT_HAVE_AVX2_PATH)
// Everything below until FT_AVX512_BF16_END is AVX-512 (+BF16) code, called only after the
// run-time check (fast_path_serves).
FT_AVX512_BF16_BEGIN
// GCC 12 reports the _mm*_undefined_* merge sources inside the intrinsics (here the reductions')
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

using simd::load16;
using simd::store16;

// One row of C elements; g / b: float32 weight and bias (nullptr: 1 / 0). The two reductions run
// four independent accumulator chains (add / FMA latency, not throughput, bounds them at C = 768).
template <typename T>
void row(const T* x, const float* g, const float* b, float eps, int64_t C, T* y) {
  const int64_t C16 = C - C % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (C % 16)) - 1);
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= C16; j += 64) {
    for (int u = 0; u < 4; ++u) s[u] = _mm512_add_ps(s[u], load16(x + j + 16 * u, 0xFFFF));
  }
  for (; j < C16; j += 16) s[0] = _mm512_add_ps(s[0], load16(x + j, 0xFFFF));
  if (tail) s[1] = _mm512_add_ps(s[1], load16(x + C16, tail));
  const float mean =
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))) / static_cast<float>(C);
  const __m512 vm = _mm512_set1_ps(mean);
  for (int u = 0; u < 4; ++u) s[u] = _mm512_setzero_ps();
  for (j = 0; j + 64 <= C16; j += 64) {
    for (int u = 0; u < 4; ++u) {
      const __m512 d = _mm512_sub_ps(load16(x + j + 16 * u, 0xFFFF), vm);
      s[u] = _mm512_fmadd_ps(d, d, s[u]);
    }
  }
  for (; j < C16; j += 16) {
    const __m512 d = _mm512_sub_ps(load16(x + j, 0xFFFF), vm);
    s[0] = _mm512_fmadd_ps(d, d, s[0]);
  }
  if (tail) {
    const __m512 d = _mm512_maskz_sub_ps(tail, load16(x + C16, tail), vm);
    s[1] = _mm512_fmadd_ps(d, d, s[1]);
  }
  const float var =
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))) / static_cast<float>(C);
  const __m512 vr = _mm512_set1_ps(1.f / std::sqrt(var + eps));
  auto put = [&](int64_t k, __mmask16 m) {
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(x + k, m), vm), vr);
    if (g) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, g + k));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + k));
    store16(y + k, m, v);
  };
  for (j = 0; j < C16; j += 16) put(j, 0xFFFF);
  if (tail) put(C16, tail);
}

template <typename T>
void rows(const T* x, const float* g, const float* b, float eps, int64_t R, int64_t C, T* y) {
  // ~1 µs of work per 768-wide row: chunks of 64 rows keep the fork cost small
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(x + r * C, g, b, eps, C, y + r * C);
  });
}

#pragma GCC diagnostic pop
FT_AVX512_BF16_END
#endif  // FT_HAVE_AVX2_PATH

}  // namespace

bool fast_path_serves(at::ScalarType dtype) {
#if defined(FT_HAVE_AVX2_PATH)
  if (dtype == at::kFloat) return cpu_isa() == CpuIsa::avx512;
  if (dtype == at::kBFloat16) return cpu_has_avx512_bf16();
#endif
  (void)dtype;
  return false;
}

at::Tensor layer_norm_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  check_args(x_in, weight, bias);
  if (!fast_path_serves(x_in.scalar_type()) || x_in.numel() == 0) return composite(x_in, weight, bias, eps);
#if defined(FT_HAVE_AVX2_PATH)
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(-1), R = x.numel() / C;
  auto affine = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor g = affine(weight), b = affine(bias);
  const float* gp = g.defined() ? g.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::Tensor y = empty_output(x.sizes(), x.options());
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    rows(static_cast<const uint16_t*>(x.const_data_ptr()), gp, bp, e, R, C,
         static_cast<uint16_t*>(y.mutable_data_ptr()));
  } else {
    rows(x.const_data_ptr<float>(), gp, bp, e, R, C, y.mutable_data_ptr<float>());
  }
  return y;
#else
  return composite(x_in, weight, bias, eps);
#endif
}

}  // namespace layer_norm
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) { m.impl("_layer_norm", &fasttrack::layer_norm::layer_norm_cpu); }
