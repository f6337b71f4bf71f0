// fasttrack::gather_tokens from planes (CPU): the NCHW-map path of the gather, dst[b, j, c] =
// src[b·sb + c·sc + index[b, j]] with token stride 1. A task owns one batch and W channels, W·elem =
// one 64-byte line: it reads its W planes (W·N·elem bytes, L1-sized at tracker maps) and writes each
// output row's W channels as one whole line. Declared in fasttrack/pad_scatter.h; the tokens layout
// and the scatter are in csrc/cpu/pad_scatter_kernel.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include <fasttrack/cpu_copy.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/pad_scatter.h>

namespace fasttrack {
namespace pad_scatter {
namespace {

#if defined(FT_HAVE_AVX2_PATH)
// Software prefetch (into L2) of the next task's planes, a few lines per output row of this task,
// so the next task's DRAM reads overlap this task's work. Requested in one burst, the same
// prefetches queue on the few L1 miss buffers and stall the core; touched in one sequential pass
// (what the first task of each thread does), the reads do not overlap anything. Interleaved A/B
// here, B=32 fp32 gathers: OSTrack-384 1.55-1.76 ms vs 2.22-2.32 ms, OSTrack-256 0.63-0.69 vs
// 0.75-0.84 ms; bf16 unchanged.
struct PlanesPrefetch {
  const char* base = nullptr;
  int64_t plane_stride = 0, lines_per_plane = 0, total = 0, next = 0, per_row = 0;
  void step() {
    for (int64_t n = 0; n < per_row && next < total; ++n, ++next) {
      __builtin_prefetch(base + (next / lines_per_plane) * plane_stride + (next % lines_per_plane) * 64, 0, 2);
    }
  }
  void finish() {
    while (next < total) step();
  }
};

// One task's full lines (AVX2): the W channels of output row j (one 64-byte line) are assembled in
// registers from W scalar loads, one per plane, and written as two 32-byte stores, streaming ones
// when the output exceeds the cache (then d + j·C must be 32-byte aligned). Measured here for a
// 576-position OSTrack-384 task of 2-byte elements: 1.0 µs, against 2.1 µs with dword gather
// instructions (slow on this CPU) and 3.9 µs for the scalar loop's 2-byte stores.
template <bool kStream>
__attribute__((target("avx2"))) inline void store_line_half(void* p, __m256i v) {
  if constexpr (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
}

// Half a line (32 bytes) of 2- or 4-byte elements q[0], q[sc], q[2·sc], ...
__attribute__((target("avx2"))) inline __m256i half_line(const uint16_t* q, int64_t sc) {
  return _mm256_setr_epi16(q[0], q[sc], q[2 * sc], q[3 * sc], q[4 * sc], q[5 * sc], q[6 * sc], q[7 * sc], q[8 * sc],
                           q[9 * sc], q[10 * sc], q[11 * sc], q[12 * sc], q[13 * sc], q[14 * sc], q[15 * sc]);
}

__attribute__((target("avx2"))) inline __m256i half_line(const uint32_t* q32, int64_t sc) {
  const int* q = reinterpret_cast<const int*>(q32);
  return _mm256_setr_epi32(q[0], q[sc], q[2 * sc], q[3 * sc], q[4 * sc], q[5 * sc], q[6 * sc], q[7 * sc]);
}

template <bool kStream, typename T>
__attribute__((target("avx2"))) void gather_lines_avx2(const T* planes, int64_t sc, const int64_t* idx, int64_t k, T* d,
                                                       int64_t C, PlanesPrefetch& pf) {
  constexpr int64_t H = 32 / sizeof(T);  // elements per half line
  for (int64_t j = 0; j < k; ++j) {
    pf.step();
    T* out = d + j * C;
    for (int64_t h = 0; h < 2; ++h) store_line_half<kStream>(out + H * h, half_line(planes + idx[j] + H * h * sc, sc));
  }
}

// One task's rows (AVX-512), walking the positions instead of the rows. With G = 16 bytes / element
// positions per group: for each group p..p+G-1, one 16-byte load per plane, plane a + G·l going to
// lane l of t[a], so the loads do the cross-lane part of the transpose; G×G transposes inside each
// 128-bit lane (transpose_lanes) then leave in t[b] the task's W = 4·G channels of position p + b, one
// 64-byte line, stored to output row inv[p + b] if that position is kept. A group costs log2(G)·G
// shuffles (fp32: 8, 2-byte: 24) against 14 (fp32) or 30 per kept line assembled from scalar loads
// (gather_lines_avx2), and each plane is read front to back. Positions past the last whole group:
// scalar. When it runs: use_position_groups. (The pragma: see simd::transpose_lanes.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <bool kStream, typename T>
__attribute__((target("avx512f,avx512bw"))) void gather_groups_avx512(const T* planes, int64_t sc, const int32_t* inv,
                                                                      int64_t N, T* d, int64_t C, PlanesPrefetch& pf) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16-byte groups of 2- or 4-byte elements");
  constexpr int G = 16 / sizeof(T), W = 64 / sizeof(T);
  const auto load = [](const T* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
  int64_t p = 0;
  for (; p + G <= N; p += G) {
    pf.step();
    int32_t j[G];
    int32_t all_empty = -1;
    for (int b = 0; b < G; ++b) all_empty &= (j[b] = inv[p + b]);
    if (all_empty < 0) continue;  // every entry kEmpty (-1); a kept one (>= 0) clears the sign bit
    __m512i t[G];
    for (int a = 0; a < G; ++a) {
      const T* q = planes + p + a * sc;
      const __m512i v = _mm512_zextsi128_si512(load(q));
      const __m512i v1 = _mm512_mask_broadcast_i32x4(v, 0x00F0, load(q + G * sc));
      const __m512i v2 = _mm512_mask_broadcast_i32x4(v1, 0x0F00, load(q + 2 * G * sc));
      t[a] = _mm512_mask_broadcast_i32x4(v2, 0xF000, load(q + 3 * G * sc));
    }
    simd::transpose_lanes<sizeof(T)>(t);
    for (int b = 0; b < G; ++b) {
      if (j[b] < 0) continue;
      __m512i* out = reinterpret_cast<__m512i*>(d + static_cast<int64_t>(j[b]) * C);
      if constexpr (kStream) {
        _mm512_stream_si512(out, t[b]);
      } else {
        _mm512_storeu_si512(out, t[b]);
      }
    }
  }
  for (; p < N; ++p) {
    if (inv[p] < 0) continue;
    T* out = d + static_cast<int64_t>(inv[p]) * C;
    for (int64_t c = 0; c < W; ++c) out[c] = planes[c * sc + p];
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

// Dispatch rule of the planes → rows gather: the position-group kernel for 2- and 4-byte elements
// on AVX-512 when a group of G = 16 / elem positions holds one kept position or more on average
// (G·k >= N); below that, assembling the few kept lines wins. Interleaved A/B here, B = 1 and
// N = 256 (OSTrack-256), groups vs lines: fp32 k = 89 8.4 vs 10.4 µs, k = 256 17 vs 22-28 µs,
// k = 8 6.7 vs 4.5 µs (crossover near k = 26-40); bf16 k = 89 6.5 vs 10.1 µs, k = 8 4.8 vs 4.4 µs
// (crossover near k = 26). OSTrack-384 at B = 32: fp32 1.07 vs 1.53 ms, bf16 0.48 vs 0.65 ms.
bool use_position_groups(int64_t elem_size, int64_t k, int64_t N) {
#if defined(FT_HAVE_AVX2_PATH)
  return (elem_size == 2 || elem_size == 4) && kHasAvx512 && (16 / elem_size) * k >= N;
#else
  return false;
#endif
}

template <typename T>
void planes_to_rows(const T* src, int64_t sb, int64_t sc, T* dst, const int64_t* index, const int32_t* inv, int64_t B,
                    int64_t k, int64_t N, int64_t C) {
  constexpr int64_t W = 64 / sizeof(T);
  const int64_t ngroups = (C + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, 2 * k * W * sizeof(T)));
  const bool uncached = static_cast<size_t>(B * N * C) * sizeof(T) > kStreamBytes;
  // an output larger than the cache is written with streaming stores (plain ones would first read
  // each output line), by whole lines: every task's W channels of a row must start a 64-byte line
  const bool stream = static_cast<size_t>(B * k * C) * sizeof(T) > kStreamPlanesBytes &&
                      reinterpret_cast<uintptr_t>(dst) % 64 == 0 && (C * sizeof(T)) % 64 == 0;
  at::parallel_for(0, B * ngroups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ngroups;
      const int64_t c0 = (task % ngroups) * W, nc = std::min(W, C - c0);
      const T* planes = src + b * sb + c0 * sc;
      const int64_t* idx = index + b * k;
      T* d = dst + elem_offset(false, b, 0, c0, k, C);
      // The kept positions are random: when the map is not cached (B = 32), the loads below would
      // walk the task's planes (W·N elements) in random order and wait on memory line by line.
      // A thread's first task touches its planes front to back (one load per line: sequential
      // demand loads let the hardware prefetcher run ahead; a burst of software prefetches queued
      // on the L1 miss buffers instead, 3.7 ms vs 2.0-2.6 ms for the B=32 OSTrack-384 fp32 gather);
      // every task requests the next one's planes while it works (PlanesPrefetch).
      const bool by_positions = inv != nullptr && nc == W;  // gather_groups_avx512
      PlanesPrefetch pf;  // the next task's planes, requested a few lines per output row (or group)
      if (uncached && task + 1 < end) {
        const int64_t t = task + 1, tc0 = (t % ngroups) * W;
        pf.base = reinterpret_cast<const char*>(src + (t / ngroups) * sb + tc0 * sc);
        pf.plane_stride = sc * sizeof(T);
        pf.lines_per_plane = (N * static_cast<int64_t>(sizeof(T)) + 63) / 64;
        pf.total = pf.lines_per_plane * std::min(W, C - tc0);
        const int64_t steps = std::max<int64_t>(1, by_positions ? N / (16 / static_cast<int64_t>(sizeof(T))) : k);
        pf.per_row = (pf.total + steps - 1) / steps;
      }
      if (uncached && task == begin) {
        for (int64_t c = 0; c < nc; ++c) {
          const volatile char* plane = reinterpret_cast<const volatile char*>(planes + c * sc);
          for (int64_t o = 0; o < N * static_cast<int64_t>(sizeof(T)); o += 64) (void)plane[o];
        }
      }
      if (nc == W) {
#if defined(FT_HAVE_AVX2_PATH)
        if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
          if (by_positions) {
            stream ? gather_groups_avx512<true>(planes, sc, inv + b * N, N, d, C, pf)
                   : gather_groups_avx512<false>(planes, sc, inv + b * N, N, d, C, pf);
            continue;
          }
          if (kHasAvx2) {
            stream ? gather_lines_avx2<true>(planes, sc, idx, k, d, C, pf)
                   : gather_lines_avx2<false>(planes, sc, idx, k, d, C, pf);
            continue;
          }
        }
#endif
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = idx[j];
          for (int64_t c = 0; c < W; ++c) d[j * C + c] = planes[c * sc + p];
        }
      } else {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = idx[j];
          for (int64_t c = 0; c < nc; ++c) d[j * C + c] = planes[c * sc + p];
        }
      }
      pf.finish();
    }
    if (stream) stream_fence();
  });
}

template void planes_to_rows<uint16_t>(const uint16_t*, int64_t, int64_t, uint16_t*, const int64_t*, const int32_t*,
                                       int64_t, int64_t, int64_t, int64_t);
template void planes_to_rows<uint32_t>(const uint32_t*, int64_t, int64_t, uint32_t*, const int64_t*, const int32_t*,
                                       int64_t, int64_t, int64_t, int64_t);
template void planes_to_rows<uint64_t>(const uint64_t*, int64_t, int64_t, uint64_t*, const int64_t*, const int32_t*,
                                       int64_t, int64_t, int64_t, int64_t);

}  // namespace pad_scatter
}  // namespace fasttrack
