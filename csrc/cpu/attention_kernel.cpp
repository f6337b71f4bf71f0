// fasttrack::_attention, CPU kernel (schema and argument checks: csrc/attention.cpp).
//
// Contract: fasttrack/reference.py::attention, softmax(q·kᵀ·scale)·v per head, q / k / v read in
// place from the qkv projection's output [B, N, 3, H, D] and the result written as [B, N, H·D], so
// the split, the per-head copies and the transpose back that an explicit or SDPA core needs around
// it are gone.
//
// Vectorised path (AVX-512; bf16 also needs AVX512_BF16), head_dim 64, float32 / bfloat16: one task
// per (batch, head); per block of kRowBlock query rows, S = q·kᵀ (fp32) stays in a thread-local
// buffer, each row's exp(S·scale - max) is written back (fp32) or as bf16 together with its sum, and
// O = P·v is scaled by 1/sum when stored. Both products run one register-tiled micro-kernel
// (kTileRows x 64 outputs, 24 accumulators): fp32 FMA, or vdpbf16ps on pairs of bf16 (k is
// repacked to [D/2][N] pairs and v to [N/2][D] pairs once per head). exp is a degree-7 polynomial
// (fp32, < 2 ulp) or degree-5 (bf16, whose rounding is 1000x larger) after range reduction.
// OSTrack-256 block (320 tokens, 12 heads), one Zen 4 core: fp32 3.52 ms vs 4.32 ms for SDPA;
// bf16 2.05 ms vs 2.82 ms for the explicit core (`python -m bench attention`, bench/attention.py).
//
// Every other input (float16 / float64, another head_dim, a CPU without those features or
// ATEN_CPU_CAPABILITY below avx512) runs the composite path: the spec's matmul + softmax through ATen
// in the accumulation dtype. `fast_path_serves` tells which; fasttrack.nn dispatches on it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <fasttrack/attention.h>
#include <fasttrack/cpu_isa.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/output_cache.h>

namespace fasttrack {
namespace attention {
namespace {

constexpr int64_t kHeadDim = 64;   // the served head dim: 4 zmm of fp32 per output row
constexpr int kTileRows = 6;       // micro-tile rows: 6 x 4 accumulators + 4 B vectors + 1 A broadcast
constexpr int64_t kRowBlock = 48;  // query rows per block: S is 48 x N fp32 (61 KB at N = 320)

at::Tensor composite(const at::Tensor& qkv, int64_t num_heads, double scale) {
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto parts = qkv.to(acc).view({B, N, 3, num_heads, C / num_heads}).permute({2, 0, 3, 1, 4});
  const auto attn = at::softmax(at::matmul(parts[0], parts[1].transpose(-2, -1)) * scale, -1);
  return at::matmul(attn, parts[2]).transpose(1, 2).reshape({B, N, C}).to(qkv.scalar_type());
}

#if defined(FT_HAVE_AVX2_PATH)
// Everything below until FT_AVX512_BF16_END is AVX-512 (+BF16) code, called only after the
// run-time check (fast_path_serves).
FT_AVX512_BF16_BEGIN

// The micro-kernels' element types. Fp32: A and B float, one FMA per k. Bf16: A bf16 read as pairs,
// B as pairs of rows (uint32: B[p][j] = (b[2p][j], b[2p+1][j])), one vdpbf16ps per pair of k.
struct Fp32Dot {
  using A = float;
  using B = float;
  static constexpr int kAStep = 1;  // A elements per k step
  static __m512 load_b(const B* p) { return _mm512_loadu_ps(p); }
  static __m512 broadcast_a(const A* p) { return _mm512_set1_ps(*p); }
  static __m512 dot(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};
struct Bf16Dot {
  using A = uint16_t;
  using B = uint32_t;
  static constexpr int kAStep = 2;
  static __m512bh load_b(const B* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh broadcast_a(const A* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static __m512 dot(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// C[MR x 64] (row stride ldc, fp32) = A[MR x K] · B[K x 64] (row strides lda, ldb, in elements of
// their type); K counts Dot's k steps (pairs for bf16).
template <typename Dot, int MR>
void tile(const typename Dot::A* A, int64_t lda, const typename Dot::B* B, int64_t ldb, int64_t K, float* C,
          int64_t ldc) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const typename Dot::B* b = B + k * ldb;
    const auto b0 = Dot::load_b(b), b1 = Dot::load_b(b + 16), b2 = Dot::load_b(b + 32), b3 = Dot::load_b(b + 48);
    for (int r = 0; r < MR; ++r) {
      const auto a = Dot::broadcast_a(A + r * lda + Dot::kAStep * k);
      acc[r][0] = Dot::dot(acc[r][0], a, b0);
      acc[r][1] = Dot::dot(acc[r][1], a, b1);
      acc[r][2] = Dot::dot(acc[r][2], a, b2);
      acc[r][3] = Dot::dot(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

// f(row, std::integral_constant<int, MR>) over rows [0, m) in tiles of kTileRows, then the tail.
template <typename F>
void for_row_tiles(int64_t m, F&& f) {
  int64_t r = 0;
  for (; r + kTileRows <= m; r += kTileRows) f(r, std::integral_constant<int, kTileRows>{});
  switch (m - r) {
    case 5: f(r, std::integral_constant<int, 5>{}); break;
    case 4: f(r, std::integral_constant<int, 4>{}); break;
    case 3: f(r, std::integral_constant<int, 3>{}); break;
    case 2: f(r, std::integral_constant<int, 2>{}); break;
    case 1: f(r, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Row i of S (n scores): p_j = exp(s_j·scale - max_j(s_j·scale)) written to P (fp32 in place, or
// bf16); returns sum_j p_j (fp32, unrounded). A NaN or +inf score makes the row NaN, as softmax.
template <typename P>
float softmax_row(float* s, int64_t n, float scale, P* p_out) {
  constexpr int kDegree = std::is_same_v<P, float> ? 7 : 5;
  const __m512 vs = _mm512_set1_ps(scale);
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  const int64_t n16 = n - n % 16;
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n16; j += 16) vm = _mm512_max_ps(vm, _mm512_mul_ps(_mm512_loadu_ps(s + j), vs));
  if (tail) vm = _mm512_mask_max_ps(vm, tail, vm, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + n16), vs));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
  __m512 sum = _mm512_setzero_ps();
  auto put = [&](int64_t j, __m512 p, __mmask16 mask) {
    if constexpr (std::is_same_v<P, float>) {
      _mm512_mask_storeu_ps(p_out + j, mask, p);
    } else {
      _mm256_mask_storeu_epi16(p_out + j, mask, (__m256i)_mm512_cvtneps_pbh(p));
    }
  };
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 p = simd::exp_ps<kDegree>(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vs, m));
    put(j, p, 0xFFFF);
    sum = _mm512_add_ps(sum, p);
  }
  if (tail) {
    const __m512 p = simd::exp_ps<kDegree>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + n16), vs, m));
    put(n16, p, tail);
    sum = _mm512_mask_add_ps(sum, tail, sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

// dst[c][j] = src[j][c] for a 16 x 16 block of 32-bit elements (rows j >= rows read as 0): 4x4
// transposes inside each 128-bit lane, then a 4x4 transpose of the lanes.
void transpose16_u32(const uint32_t* src, int64_t ld_src, int64_t rows, uint32_t* dst, int64_t ld_dst) {
  __m512i t[16];
  for (int j = 0; j < 16; ++j) t[j] = j < rows ? _mm512_loadu_si512(src + j * ld_src) : _mm512_setzero_si512();
  for (int g = 0; g < 4; ++g) simd::transpose_lanes<4>(t + 4 * g);
  for (int i = 0; i < 4; ++i) {  // t[4g + i], lane L: rows 4g..4g+3 of column 4L + i
    const __m512i u0 = _mm512_shuffle_i32x4(t[i], t[4 + i], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i u1 = _mm512_shuffle_i32x4(t[i], t[4 + i], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i u2 = _mm512_shuffle_i32x4(t[8 + i], t[12 + i], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i u3 = _mm512_shuffle_i32x4(t[8 + i], t[12 + i], _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_si512(dst + (0 + i) * ld_dst, _mm512_shuffle_i32x4(u0, u2, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(dst + (4 + i) * ld_dst, _mm512_shuffle_i32x4(u0, u2, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(dst + (8 + i) * ld_dst, _mm512_shuffle_i32x4(u1, u3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(dst + (12 + i) * ld_dst, _mm512_shuffle_i32x4(u1, u3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// dst[c][j] = src[j][c] for j < n, c < cols (a multiple of 16), 32-bit elements; dst has ld_dst >=
// round_up(n, 16) columns, the ones past n written as 0.
void transpose_u32(const uint32_t* src, int64_t ld_src, int64_t n, int64_t cols, uint32_t* dst, int64_t ld_dst) {
  for (int64_t j = 0; j < n; j += 16)
    for (int64_t c = 0; c < cols; c += 16)
      transpose16_u32(src + j * ld_src + c, ld_src, std::min<int64_t>(16, n - j), dst + c * ld_dst + j, ld_dst);
}

struct Workspace {
  std::vector<float> kt, s;                // fp32: kᵀ [D][Np]; scores / probabilities [kRowBlock][Np]
  std::vector<uint32_t> k_pairs, v_pairs;  // bf16: k as [D/2][Np] pairs, v as [N2/2][D] pairs
  std::vector<uint16_t> p;                 // bf16 probabilities [kRowBlock][N2]
  float tile[kTileRows * kHeadDim];
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// o[i] = tile[i] / sum for one output row of 64 (fp32 or bf16).
inline void store_row(const float* tile, float inv_sum, float* o) {
  const __m512 s = _mm512_set1_ps(inv_sum);
  for (int c = 0; c < kHeadDim; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(tile + c), s));
}
inline void store_row(const float* tile, float inv_sum, uint16_t* o) {
  const __m512 s = _mm512_set1_ps(inv_sum);
  for (int c = 0; c < kHeadDim; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(tile + c), s)));
}

// One (batch, head): q / k / v rows of 64 at stride ld; o rows at stride ldo.
void head_f32(const float* q, const float* k, const float* v, int64_t ld, int64_t N, float scale, float* o, int64_t ldo,
              Workspace& w) {
  const int64_t Np = round_up(N, 64);
  // columns past round_up(N, 16) hold zeros or an earlier head's k: their scores are never read
  w.kt.resize(kHeadDim * Np);
  transpose_u32(reinterpret_cast<const uint32_t*>(k), ld, N, kHeadDim, reinterpret_cast<uint32_t*>(w.kt.data()), Np);
  w.s.resize(kRowBlock * Np);
  float inv_sum[kRowBlock];
  for (int64_t i0 = 0; i0 < N; i0 += kRowBlock) {
    const int64_t mb = std::min(kRowBlock, N - i0);
    for_row_tiles(mb, [&](int64_t r, auto rows) {
      for (int64_t j0 = 0; j0 < Np; j0 += 64)
        tile<Fp32Dot, decltype(rows)::value>(q + (i0 + r) * ld, ld, w.kt.data() + j0, Np, kHeadDim,
                                             w.s.data() + r * Np + j0, Np);
    });
    for (int64_t r = 0; r < mb; ++r) {
      float* row = w.s.data() + r * Np;
      inv_sum[r] = 1.f / softmax_row(row, N, scale, row);
    }
    for_row_tiles(mb, [&](int64_t r, auto rows) {
      constexpr int MR = decltype(rows)::value;
      tile<Fp32Dot, MR>(w.s.data() + r * Np, Np, v, ld, N, w.tile, kHeadDim);
      for (int rr = 0; rr < MR; ++rr) store_row(w.tile + rr * kHeadDim, inv_sum[r + rr], o + (i0 + r + rr) * ldo);
    });
  }
}

void head_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld, int64_t N, float scale, uint16_t* o,
               int64_t ldo, Workspace& w) {
  const int64_t Np = round_up(N, 64), N2 = round_up(N, 2);
  w.k_pairs.resize(kHeadDim / 2 * Np);  // columns past round_up(N, 16): as head_f32's kt
  // ld is even (3·C), so each row's pairs are 32-bit aligned with the row
  transpose_u32(reinterpret_cast<const uint32_t*>(k), ld / 2, N, kHeadDim / 2, w.k_pairs.data(), Np);
  w.v_pairs.resize(N2 / 2 * kHeadDim);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t n = 0; n < N2; n += 2) {
    const uint16_t* a = v + n * ld;
    uint32_t* dst = w.v_pairs.data() + n / 2 * kHeadDim;
    for (int64_t c = 0; c < kHeadDim; c += 32) {  // 32 columns of rows n and n + 1 -> 32 pairs
      const __m512i x = _mm512_loadu_si512(a + c);
      const __m512i y = n + 1 < N ? _mm512_loadu_si512(a + ld + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
  w.s.resize(kRowBlock * Np);
  w.p.resize(kRowBlock * N2);
  float inv_sum[kRowBlock];
  for (int64_t i0 = 0; i0 < N; i0 += kRowBlock) {
    const int64_t mb = std::min(kRowBlock, N - i0);
    for_row_tiles(mb, [&](int64_t r, auto rows) {
      for (int64_t j0 = 0; j0 < Np; j0 += 64)
        tile<Bf16Dot, decltype(rows)::value>(q + (i0 + r) * ld, ld, w.k_pairs.data() + j0, Np, kHeadDim / 2,
                                             w.s.data() + r * Np + j0, Np);
    });
    for (int64_t r = 0; r < mb; ++r) {
      inv_sum[r] = 1.f / softmax_row(w.s.data() + r * Np, N, scale, w.p.data() + r * N2);
      if (N2 != N) w.p[r * N2 + N] = 0;  // an odd N's pad column pairs with v_pairs' zero row: 0, not an old NaN
    }
    for_row_tiles(mb, [&](int64_t r, auto rows) {
      constexpr int MR = decltype(rows)::value;
      tile<Bf16Dot, MR>(w.p.data() + r * N2, N2, w.v_pairs.data(), kHeadDim, N2 / 2, w.tile, kHeadDim);
      for (int rr = 0; rr < MR; ++rr) store_row(w.tile + rr * kHeadDim, inv_sum[r + rr], o + (i0 + r + rr) * ldo);
    });
  }
}

FT_AVX512_BF16_END
#endif  // FT_HAVE_AVX2_PATH

}  // namespace

bool fast_path_serves(at::ScalarType dtype, int64_t head_dim) {
#if defined(FT_HAVE_AVX2_PATH)
  if (head_dim != kHeadDim) return false;
  if (dtype == at::kFloat) return cpu_isa() == CpuIsa::avx512;
  if (dtype == at::kBFloat16) return cpu_has_avx512_bf16();
#endif
  (void)dtype;
  (void)head_dim;
  return false;
}

at::Tensor attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, double scale) {
  check_args(qkv_in, num_heads);
  const int64_t B = qkv_in.size(0), N = qkv_in.size(1), C = qkv_in.size(2) / 3, H = num_heads;
  if (!fast_path_serves(qkv_in.scalar_type(), C / H) || B * N == 0) return composite(qkv_in, H, scale);
#if defined(FT_HAVE_AVX2_PATH)
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = empty_output({B, N, C}, qkv.options());
  const int64_t ld = 3 * C, D = kHeadDim;
  const bool bf16 = qkv.scalar_type() == at::kBFloat16;
  const void* base = qkv.const_data_ptr();
  void* obase = out.mutable_data_ptr();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Workspace w;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, h = t % H;
      const int64_t in_off = b * N * ld + h * D, out_off = b * N * C + h * D;
      if (bf16) {
        const uint16_t* q = static_cast<const uint16_t*>(base) + in_off;
        head_bf16(q, q + C, q + 2 * C, ld, N, static_cast<float>(scale), static_cast<uint16_t*>(obase) + out_off, C, w);
      } else {
        const float* q = static_cast<const float*>(base) + in_off;
        head_f32(q, q + C, q + 2 * C, ld, N, static_cast<float>(scale), static_cast<float*>(obase) + out_off, C, w);
      }
    }
  });
  return out;
#else
  return composite(qkv_in, H, scale);
#endif
}

}  // namespace attention
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) { m.impl("_attention", &fasttrack::attention::attention_cpu); }
