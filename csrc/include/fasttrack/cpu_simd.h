// SIMD helpers of the CPU kernels (host only; each function carries its target attribute, since the
// extension is built for baseline x86-64 and picks these paths at run time: fasttrack/cpu_isa.h).
#pragma once

#include <cstdint>

#include "fasttrack/cpu_isa.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fasttrack {
namespace simd {

#if defined(FT_HAVE_AVX2_PATH)
// 8 bf16 -> 8 fp32: a bf16 is the high half of a float, so this is a 16-bit shift of the bits.
__attribute__((target("avx2"))) inline __m256 load_bf16x8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// 8 fp32 -> 8 bf16, round to nearest even, NaN -> quiet NaN (as c10::BFloat16).
__attribute__((target("avx2"))) inline void store_bf16x8(uint16_t* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // pack the 8 low halves: packus works per 128-bit lane, so fix the lane order after
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif

// V×V block transposes (V = 16 bytes / element): r[i] holds row i's V channels on entry, channel
// i's V rows on exit. Pure lane moves, so any element type of that size is carried bit-exactly.
#if defined(__SSE2__)
template <int kSize>
struct Transpose;

template <>
struct Transpose<2> {
  static void run(__m128i* r) {
    __m128i a[8], b[8];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
      a[i + 4] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // channels 0-3 (h = 0) and 4-7 (h = 1)
      b[4 * h + 0] = _mm_unpacklo_epi32(a[4 * h + 0], a[4 * h + 1]);
      b[4 * h + 1] = _mm_unpacklo_epi32(a[4 * h + 2], a[4 * h + 3]);
      b[4 * h + 2] = _mm_unpackhi_epi32(a[4 * h + 0], a[4 * h + 1]);
      b[4 * h + 3] = _mm_unpackhi_epi32(a[4 * h + 2], a[4 * h + 3]);
    }
    for (int i = 0; i < 4; ++i) {
      r[2 * i] = _mm_unpacklo_epi64(b[2 * i], b[2 * i + 1]);
      r[2 * i + 1] = _mm_unpackhi_epi64(b[2 * i], b[2 * i + 1]);
    }
  }
};

template <>
struct Transpose<4> {
  static void run(__m128i* r) {
    const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
    const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t1);
    r[1] = _mm_unpackhi_epi64(t0, t1);
    r[2] = _mm_unpacklo_epi64(t2, t3);
    r[3] = _mm_unpackhi_epi64(t2, t3);
  }
};

template <>
struct Transpose<8> {
  static void run(__m128i* r) {
    const __m128i t0 = _mm_unpacklo_epi64(r[0], r[1]);
    r[1] = _mm_unpackhi_epi64(r[0], r[1]);
    r[0] = t0;
  }
};
#endif

#if defined(FT_HAVE_AVX2_PATH)
// The same V×V transposes inside each 128-bit lane of four __m512i registers (AVX-512 BW): four
// independent blocks at once. GCC 12's _mm512_unpack* pass _mm512_undefined_epi32() as the unused
// merge source, which -Wmaybe-uninitialized reports at every call.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int kSize>
__attribute__((target("avx512f,avx512bw"))) inline void transpose_lanes(__m512i* r) {
  if constexpr (kSize == 4) {  // as Transpose<4>, per lane
    const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]), t1 = _mm512_unpacklo_epi32(r[2], r[3]);
    const __m512i t2 = _mm512_unpackhi_epi32(r[0], r[1]), t3 = _mm512_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm512_unpacklo_epi64(t0, t1);
    r[1] = _mm512_unpackhi_epi64(t0, t1);
    r[2] = _mm512_unpacklo_epi64(t2, t3);
    r[3] = _mm512_unpackhi_epi64(t2, t3);
  } else {  // kSize == 2: as Transpose<2>, per lane
    __m512i a[8], b[8];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
      a[i + 4] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      b[4 * h + 0] = _mm512_unpacklo_epi32(a[4 * h + 0], a[4 * h + 1]);
      b[4 * h + 1] = _mm512_unpacklo_epi32(a[4 * h + 2], a[4 * h + 3]);
      b[4 * h + 2] = _mm512_unpackhi_epi32(a[4 * h + 0], a[4 * h + 1]);
      b[4 * h + 3] = _mm512_unpackhi_epi32(a[4 * h + 2], a[4 * h + 3]);
    }
    for (int i = 0; i < 4; ++i) {
      r[2 * i] = _mm512_unpacklo_epi64(b[2 * i], b[2 * i + 1]);
      r[2 * i + 1] = _mm512_unpackhi_epi64(b[2 * i], b[2 * i + 1]);
    }
  }
}
#pragma GCC diagnostic pop
#endif

#if defined(FT_HAVE_AVX2_PATH)
// 16 lanes of fp32 or bf16 (as uint16_t) <-> 16 fp32 lanes, masked. bf16 -> fp32 is exact; fp32 ->
// bf16 rounds to nearest even, NaN stays NaN (as c10::BFloat16; denormal results flush to zero).
__attribute__((target("avx512f"))) inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
__attribute__((target("avx512f"))) inline void store16(float* p, __mmask16 m, __m512 v) {
  _mm512_mask_storeu_ps(p, m, v);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void store16(uint16_t* p, __mmask16 m,
                                                                                    __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// exp(x): x = n·ln2 + f, |f| <= ln2/2, 2^n · Taylor(f). Degree 7: relative error < 1e-8 before
// rounding; degree 5: < 3e-6. Denormal results as expf (scalef), 0 below -150 (-inf included: the
// clamp keeps f finite); NaN stays NaN.
template <int kDegree>
__attribute__((target("avx512f"))) inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-150.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  static constexpr float kInvFactorial[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
  __m512 p = _mm512_set1_ps(kInvFactorial[kDegree]);
  for (int i = kDegree - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kInvFactorial[i]));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#endif

}  // namespace simd
}  // namespace fasttrack
