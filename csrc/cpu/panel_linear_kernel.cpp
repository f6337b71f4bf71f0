// fasttrack::panel_linear (csrc/include/fasttrack/panel_linear.h): the blocked inference GEMM of the
// fused ViT blocks over oneDNN's brgemm micro-kernel.
//
// Blocking: one task per (64-column panel, chunk of kRowChunk rows); a task accumulates its rows x 64
// outputs in fp32 over K in chunks of kKChunk (so a panel's slice of W, 768 x 64 = 96 KiB bf16 /
// 192 KiB fp32, stays in L2 across the chunk's rows), then runs the epilogue (bias, GELU or residual,
// one rounding to x's dtype) on the tile while it is in L1. Tasks are panel-major and split evenly
// over the threads (at::parallel_for), so each thread streams its own panels of W once per chunk.
// Measured against oneDNN's packed primitive with the same post-op (torch.ops.mkldnn._linear_pointwise,
// the path this replaces), ViT-B linears at 320 tokens on the 2-core Zen 4 VM, interleaved medians:
// `python -m bench gemm` (docs/results.md has the numbers).
#include <fasttrack/panel_linear.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <fasttrack/cpu_isa.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/output_cache.h>

namespace fasttrack {
namespace panel_linear {
namespace {

// Chosen on the Zen 4 VM over ViT-B linears at 320 and 2560 rows, 1 and 2 threads: 64 / 128 / 256
// rows alike; a K chunk of 384 or all of K (3072) slower (fp32 fc2: 1.26x oneDNN unchunked).
constexpr int64_t kRowChunk = 128;  // rows per task (one brgemm call per K chunk)
constexpr int64_t kKChunk = 768;    // even: a bf16 chunk starts on a VNNI pair
// Tasks run in blocks of kChunksPerBlock row chunks x all panels, panel-major inside a block: a
// block's rows of x (512 x 768 = 768 KiB bf16) are reused from L2 across its panels, and at 320 rows
// (one block) the threads split the panels evenly. Whole-M panel-major order was 1.00-1.015x oneDNN
// at 2560 rows (x re-streamed per panel); chunk-major 1.13-1.17x at 320 rows on 2 threads (imbalance).
constexpr int64_t kChunksPerBlock = 4;

bool brgemm_runs_bf16() {
  // The bf16 micro-kernel raises where oneDNN's ukernel API is not compiled in or the effective ISA
  // (ONEDNN_MAX_CPU_ISA) is below AVX-512: ask once, on a 1 x 64 x 2 product with a known result.
  try {
    std::vector<at::BFloat16> a(2, at::BFloat16(1.0f)), b(2 * kPanel);
    for (int64_t j = 0; j < kPanel; ++j) {
      b[2 * j] = at::BFloat16(static_cast<float>(j));
      b[2 * j + 1] = at::BFloat16(2.0f);
    }
    std::vector<float> c(kPanel, -1.0f);
    at::native::cpublas::brgemm(1, kPanel, 2, 2, kPanel, kPanel, false, a.data(), b.data(), c.data(), true);
    for (int64_t j = 0; j < kPanel; ++j) {
      if (c[j] != static_cast<float>(j) + 2.0f) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

#if defined(FT_HAVE_AVX2_PATH)
// Everything below until FT_AVX512_BF16_END is AVX-512 (+BF16) code, called only where `serves`
// holds (fp32 needs AVX-512 F only: no BF16 instruction is reached on its path).
FT_AVX512_BF16_BEGIN
// GCC 12 reports the _mm512_undefined_* merge sources inside the intrinsics at every inlined call
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

using simd::load16;
using simd::store16;

// 0.5·x·(1 + erf(x/√2)); erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the approximation
// ATen's vectorised CPU GELU and oneDNN's gelu_erf post-op use, with exp to < 2 ulp. NaN stays NaN.
inline __m512 gelu_erf(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 a = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = simd::exp_ps<7>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a));
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, e, one);  // 1 - poly·exp(-z²)
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(erf_abs), _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN))));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

// y[r][0:64] = epilogue(acc[r][0:64] + bias[0:64]) for `rows` rows (y / residual row stride ld); S is
// float or uint16_t (bf16 bits).
template <typename S>
void epilogue_tile(const float* acc, int64_t rows, const S* bias, Epilogue epilogue, const S* residual, S* y,
                   int64_t ld) {
  __m512 b[4];
  for (int c = 0; c < 4; ++c) b[c] = bias != nullptr ? load16(bias + 16 * c, 0xFFFF) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < 4; ++c) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + r * kPanel + 16 * c), b[c]);
      if (epilogue == Epilogue::gelu) v = gelu_erf(v);
      if (epilogue == Epilogue::add) v = _mm512_add_ps(v, load16(residual + r * ld + 16 * c, 0xFFFF));
      store16(y + r * ld + 16 * c, 0xFFFF, v);
    }
  }
}

#pragma GCC diagnostic pop
FT_AVX512_BF16_END
#endif

template <typename T>
void run(const T* x, const T* packed, const T* bias, Epilogue epilogue, const T* residual, T* y, int64_t M, int64_t N,
         int64_t K) {
#if defined(FT_HAVE_AVX2_PATH)
  constexpr bool kVnni = std::is_same_v<T, at::BFloat16>;
  using S = std::conditional_t<kVnni, uint16_t, float>;  // the epilogue's view of T (simd::load16 / store16)
  const S* bias_s = reinterpret_cast<const S*>(bias);
  const S* residual_s = reinterpret_cast<const S*>(residual);
  S* y_s = reinterpret_cast<S*>(y);
  const int64_t panels = N / kPanel, chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, panels * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kRowChunk * kPanel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / (panels * kChunksPerBlock), within = task % (panels * kChunksPerBlock);
      const int64_t block_chunks = std::min(kChunksPerBlock, chunks - block * kChunksPerBlock);
      const int64_t p = within / block_chunks, m0 = (block * kChunksPerBlock + within % block_chunks) * kRowChunk;
      const int64_t rows = std::min(kRowChunk, M - m0);
      const T* w = packed + p * K * kPanel;
      for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
        // a short chunk in power-of-two pieces: ATen keeps one JIT kernel per thread and shape,
        // never evicted, so row counts that vary per call (pruned or merged token sets) must not
        // each get their own
        for (int64_t r0 = 0; r0 < rows;) {
          const int64_t m = rows - r0 == kRowChunk ? kRowChunk : int64_t{1} << (63 - __builtin_clzll(rows - r0));
          at::native::cpublas::brgemm(m, kPanel, std::min(kKChunk, K - k0), K, kPanel, kPanel, k0 > 0,
                                      x + (m0 + r0) * K + k0, w + k0 * kPanel, acc.data() + r0 * kPanel, kVnni);
          r0 += m;
        }
      }
      const int64_t col = p * kPanel;
      epilogue_tile(acc.data(), rows, bias_s == nullptr ? nullptr : bias_s + col, epilogue,
                    residual_s == nullptr ? nullptr : residual_s + m0 * N + col, y_s + m0 * N + col, N);
    }
  });
#else
  TORCH_CHECK(false, "fasttrack.panel_linear: not built with the x86 kernels");
#endif
}

template <typename T>
void pack_weight(const at::Tensor& weight, T* out) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto w = weight.accessor<T, 2>();
  at::parallel_for(0, N / kPanel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* panel = out + p * K * kPanel;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < kPanel; ++j) {
          const T v = w[p * kPanel + j][k];
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            panel[(k / 2) * 2 * kPanel + 2 * j + (k % 2)] = v;
          } else {
            panel[k * kPanel + j] = v;
          }
        }
      }
    }
  });
}

// The static part of the rule: AVX-512 (under ATEN_CPU_CAPABILITY), not AMX, and the bf16
// micro-kernel running here. Decided once, while oneDNN is enabled: ATen's brgemm and could_pack
// both answer "no" while it is off, so an answer taken then is not kept.
bool micro_kernel_serves() {
#if defined(FT_HAVE_AVX2_PATH)
  static std::atomic<int> decided{-1};
  const int known = decided.load(std::memory_order_acquire);
  if (known >= 0) return known == 1;
  const bool ok = cpu_isa() == CpuIsa::avx512 && !at::native::cpublas::could_pack(at::kBFloat16) && brgemm_runs_bf16();
  if (!at::globalContext().userEnabledMkldnn()) return false;
  decided.store(ok ? 1 : 0, std::memory_order_release);
  return ok;
#else
  return false;
#endif
}

void check_serves(at::ScalarType dtype, int64_t in_features, int64_t out_features, const char* fn) {
  TORCH_CHECK_VALUE(serves(dtype, in_features, out_features), "fasttrack.panel_linear.", fn,
                    ": this path does not serve a ", dtype, " weight of ", out_features, " x ", in_features,
                    " here (it needs float32 or bfloat16, out_features a multiple of ", kPanel,
                    ", an even in_features for bfloat16, an AVX-512 CPU (AVX512_BF16 for bfloat16) "
                    "without AMX, and oneDNN enabled; CPU kernels' ISA: ",
                    cpu_isa_name(), ")");
}

}  // namespace

bool serves(at::ScalarType dtype, int64_t in_features, int64_t out_features) {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  if (in_features <= 0 || out_features <= 0 || out_features % kPanel != 0) return false;
  if (dtype == at::kFloat) return micro_kernel_serves();
#if defined(FT_HAVE_AVX2_PATH)
  if (dtype == at::kBFloat16) return in_features % 2 == 0 && cpu_has_avx512_bf16() && micro_kernel_serves();
#endif
  return false;
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(
      weight.defined() && weight.device().is_cpu() && weight.layout() == at::kStrided && weight.dim() == 2,
      "fasttrack.panel_linear.pack: `weight` must be a 2-D strided CPU tensor [out_features, "
      "in_features], got ",
      weight.defined() ? weight.toString() : std::string("None"), " of shape ",
      weight.defined() ? weight.sizes() : at::IntArrayRef());
  check_serves(weight.scalar_type(), weight.size(1), weight.size(0), "pack");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty({N / kPanel, K, kPanel}, weight.options());
  if (weight.scalar_type() == at::kBFloat16) {
    pack_weight(weight, out.data_ptr<at::BFloat16>());
  } else {
    pack_weight(weight, out.data_ptr<float>());
  }
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  Epilogue epilogue, const std::optional<at::Tensor>& residual) {
  const char* fn = "fasttrack.panel_linear.linear";
  TORCH_CHECK_VALUE(
      x.defined() && x.device().is_cpu() && x.layout() == at::kStrided && x.dim() >= 1 && x.is_contiguous(), fn,
      ": `x` must be a contiguous strided CPU tensor [..., in_features]");
  TORCH_CHECK_VALUE(packed.defined() && packed.device().is_cpu() && packed.layout() == at::kStrided &&
                        packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kPanel,
                    fn, ": `packed` must be a weight packed by fasttrack.panel_linear.pack ([out_features/", kPanel,
                    ", in_features, ", kPanel, "] contiguous CPU), got shape ",
                    packed.defined() ? packed.sizes() : at::IntArrayRef());
  const auto dtype = x.scalar_type();
  const int64_t K = packed.size(1), N = packed.size(0) * kPanel;
  TORCH_CHECK_VALUE(packed.scalar_type() == dtype, fn, ": `packed` must have x's dtype ", dtype, ", got ",
                    packed.scalar_type());
  TORCH_CHECK_VALUE(x.size(-1) == K, fn, ": `x`'s last dim must be the weight's in_features ", K, ", got shape ",
                    x.sizes());
  check_serves(dtype, K, N, "linear");
  at::Tensor bias_c;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.defined() && b.device().is_cpu() && b.layout() == at::kStrided && b.dim() == 1 &&
                          b.size(0) == N && b.scalar_type() == dtype,
                      fn, ": `bias` must be a [", N, "] CPU tensor of x's dtype ", dtype);
    bias_c = b.contiguous();
  }
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  TORCH_CHECK_VALUE(residual.has_value() == (epilogue == Epilogue::add), fn,
                    ": `residual` must be given exactly for the add epilogue");
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK_VALUE(r.defined() && r.device().is_cpu() && r.layout() == at::kStrided && r.is_contiguous() &&
                          r.scalar_type() == dtype && r.sizes() == at::IntArrayRef(out_sizes),
                      fn, ": `residual` must be a contiguous CPU tensor of x's dtype ", dtype, " and shape ",
                      at::IntArrayRef(out_sizes));
  }
  // a profiler event under one name on both callers (the Python path and the native ViT block)
  RECORD_FUNCTION("fasttrack::panel_linear", std::vector<c10::IValue>());
  at::Tensor y = empty_output(out_sizes, x.options());
  const int64_t M = x.numel() / K;
  if (M == 0) return y;
  const at::Tensor* r = residual.has_value() ? &*residual : nullptr;
  const at::Tensor* b = bias_c.defined() ? &bias_c : nullptr;
  if (dtype == at::kBFloat16) {
    using T = at::BFloat16;
    run<T>(x.const_data_ptr<T>(), packed.const_data_ptr<T>(), b ? b->const_data_ptr<T>() : nullptr, epilogue,
           r ? r->const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), M, N, K);
  } else {
    run<float>(x.const_data_ptr<float>(), packed.const_data_ptr<float>(), b ? b->const_data_ptr<float>() : nullptr,
               epilogue, r ? r->const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), M, N, K);
  }
  return y;
}

}  // namespace panel_linear
}  // namespace fasttrack
