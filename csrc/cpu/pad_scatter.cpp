// Schema of fasttrack::gather_tokens, fasttrack::pad_scatter (kept identical to fasttrack/ops/pad_scatter.py;
// tests/test_registry.py compares them) and the native CPU kernel.
//
// CPU kernel: validate every index row first (range + duplicates, always: it costs O(B·L) int32 work
// against the O(B·L·C) copy, so `check_index` only matters on CUDA), then one pass over the output,
// parallel over batch × tokens, writing each output element once. Both ops are the "row map" of
// fasttrack/pad_scatter.h: gather maps through `index`, scatter through its inverse (kEmpty → zeros).
// The kernels move bytes, so they are instantiated per element size, not per dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <fasttrack/cpu_copy.h>
#include <fasttrack/output_cache.h>
#include <fasttrack/pad_scatter.h>

namespace fasttrack {
namespace pad_scatter {
namespace {

constexpr int64_t kGrainBytes = 64 * 1024;  // below this per task, a thread switch costs more than it saves
constexpr int64_t kChannelBlock = 128;      // channel planes per nchw scatter task (the unit of parallel work)
constexpr int64_t kAhead = 4;               // rows a large row copy prefetches ahead
// nchw outputs above this are written with streaming stores: lower than the row copies' kStreamBytes
// because the plane writes of a scatter land scattered over the whole map (B=32 OSTrack-256 bf16,
// a 12.6 MB map: 1.3 ms with plain stores, 0.55 ms streaming); B=1 maps (< 2 MB) stay in cache.
constexpr size_t kStreamPlanesBytes = size_t{4} << 20;

bool parse_layout(c10::string_view layout, const char* op) {
  TORCH_CHECK_VALUE(layout == "tokens" || layout == "nchw", "fasttrack.", op,
                    ": `layout` must be one of ('tokens', 'nchw'), got '", layout, "'");
  return layout == "nchw";
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "fasttrack.",
                   op, ": `", name, "` must have dtype in (float32, float16, bfloat16, float64), got ", st);
}

void check_index_meta(const at::Tensor& index, const at::Tensor& data, const char* op, const char* data_name) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "fasttrack.", op, ": `index` must have dtype int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2, "fasttrack.", op, ": `index` must have 2 dims, got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == data.device(), "fasttrack.", op, ": `index` must be on ", data.device(),
                    " (like `", data_name, "`), got ", index.device());
  TORCH_CHECK_VALUE(index.size(0) == data.size(0), "fasttrack.", op, ": `index` must have shape [",
                    data.size(0), ", *] (batch of `", data_name, "`), got ", index.sizes());
}

[[noreturn]] void raise_bad_index(const char* op, const RowCheck& rc, const int64_t* row, int64_t b,
                                  int64_t length) {
  if (rc.error == kIndexOutOfRange) {
    TORCH_CHECK_VALUE(false, "fasttrack.", op, ": `index`[", b, ", ", rc.j, "] = ", row[rc.j],
                      " is out of range [0, ", length, ")");
  }
  TORCH_CHECK_VALUE(false, "fasttrack.", op, ": `index`[", b, ", ", rc.j, "] = ", row[rc.j], " repeats `index`[",
                    b, ", ", rc.first_j, "]; indices must be distinct within a row");
}

// Validates all rows before anything is written. inv: [B, length] inverse maps (scatter) or one
// reused row of scratch (gather, inv_per_row = false).
void check_rows(const char* op, const int64_t* index, int64_t B, int64_t k, int64_t length, int32_t* inv,
                bool inv_per_row) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = index + b * k;
    const RowCheck rc = build_inverse_row(row, k, length, inv + (inv_per_row ? b * length : 0));
    if (rc.error != kIndexOk) raise_bad_index(op, rc, row, b, length);
  }
}

// Row map, tokens layout: out row i = (b, r) is source row map[i] of batch b, or zeros.
// Source rows are contiguous (C elements), strided by sb / st elements; output contiguous.
template <typename T, typename MapT>
void rows_to_rows(const T* src, int64_t sb, int64_t st, T* dst, const MapT* map, int64_t B, int64_t R,
                  int64_t C) {
  const size_t row_bytes = static_cast<size_t>(C) * sizeof(T);
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, C * sizeof(T)));
  const bool stream = static_cast<size_t>(B * R) * row_bytes > kStreamBytes;
  at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t s = map[i];
      if (s >= 0) {
        // the source rows come in map order, which no hardware prefetcher guesses
        const int64_t ahead = i + kAhead;
        if (stream && ahead < end && map[ahead] >= 0) prefetch_bytes(src + (ahead / R) * sb + map[ahead] * st, row_bytes);
        copy_bytes(dst + i * C, src + (i / R) * sb + s * st, row_bytes, stream);
        ++i;
      } else {  // a run of empty rows is one contiguous span of the output: one memset
        int64_t j = i + 1;
        while (j < end && map[j] < 0) ++j;
        std::memset(dst + i * C, 0, row_bytes * static_cast<size_t>(j - i));
        i = j;
      }
    }
    if (stream) stream_fence();
  });
}

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

// 4-byte elements on CPUs with AVX2 (chosen at run time: the extension is built for baseline x86-64):
// 8×8 transposes, half the stores of the SSE2 4×4 path.
#if defined(FT_HAVE_AVX2_PATH)
template <bool kStream, typename T>
__attribute__((target("avx2"))) int64_t transpose_lines_avx2(const T* const* rows, int64_t c, int64_t c1,
                                                             T* planes, int64_t L) {
  static_assert(sizeof(T) == 4, "8x8 transpose of 4-byte elements");
  for (; c + 8 <= c1; c += 8) {
    for (int64_t g = 0; g < 16; g += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows[g + i] + c));
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
        r[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {
        float* d0 = reinterpret_cast<float*>(planes + (c + i) * L + g);
        float* d1 = reinterpret_cast<float*>(planes + (c + i + 4) * L + g);
        if constexpr (kStream) {
          _mm256_stream_ps(d0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
          _mm256_stream_ps(d1, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
        } else {
          _mm256_storeu_ps(d0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
          _mm256_storeu_ps(d1, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
        }
      }
    }
  }
  return c;
}
#endif

// One tile of P = 64 / elem positions (`rows`: their P source rows) into planes[c·L + p], channels
// [c, c1) in steps of V, each step completing V whole plane lines. Returns the first channel left to
// the caller's scalar loop. kStream: the lines go out with streaming stores (every plane line
// planes + c·L must be 32-byte aligned; the caller fences).
template <bool kStream, typename T>
int64_t transpose_lines(const T* const* rows, int64_t c, int64_t c1, T* planes, int64_t L) {
#if defined(__SSE2__)
  constexpr int64_t V = 16 / sizeof(T), P = 64 / sizeof(T);
#if defined(FT_HAVE_AVX2_PATH)
  if constexpr (sizeof(T) == 4) {
    if (kHasAvx2) c = transpose_lines_avx2<kStream>(rows, c, c1, planes, L);
  }
#endif
  for (; c + V <= c1; c += V) {
    for (int64_t g = 0; g < P; g += V) {
      __m128i r[V];
      for (int64_t i = 0; i < V; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[g + i] + c));
      Transpose<sizeof(T)>::run(r);
      for (int64_t i = 0; i < V; ++i) {
        __m128i* d = reinterpret_cast<__m128i*>(planes + (c + i) * L + g);
        if constexpr (kStream) {
          _mm_stream_si128(d, r[i]);
        } else {
          _mm_storeu_si128(d, r[i]);
        }
      }
    }
  }
#endif
  return c;
}

// Scatter to nchw: dst[b, c, p] = src row inv[b, p] at channel c (or 0). Plane strides are often a
// power of two (L·elem = 1 KB at OSTrack-256 fp32), which folds all planes onto a few L1 sets, so the
// loop never keeps more than V plane lines half-written: a task (batch, block of channels) walks the
// positions in tiles of P = one 64-byte line of a plane; for every V channels it transposes the P
// rows' V-channel slices in registers (P/V transposes) and so completes V plane lines at once.
template <typename T>
void rows_to_planes(const T* src, int64_t sb, int64_t st, T* dst, const int32_t* inv, int64_t B, int64_t L,
                    int64_t C) {
  constexpr int64_t P = 64 / sizeof(T);
  const std::vector<T> zeros(C, T(0));
  const int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, L * kChannelBlock * sizeof(T)));
  // A large map is written with streaming stores: plain stores would first read every output line
  // (as many bytes again as the write). They need aligned addresses (32 bytes for the AVX2 path), so
  // only maps whose planes all start a 64-byte line stream (not, e.g., UTPTrack-S's 196-token fp32
  // planes of 784 bytes).
  const bool stream = static_cast<size_t>(B * L * C) * sizeof(T) > kStreamPlanesBytes &&
                      reinterpret_cast<uintptr_t>(dst) % 64 == 0 && (L * sizeof(T)) % 64 == 0;
  // Maps whose planes are a power of two bytes (OSTrack-256: 512 B bf16, 1 KB fp32) are written in
  // channel strips (below); the others by position tiles, which was 5-15% faster there.
  const size_t plane_bytes = static_cast<size_t>(L) * sizeof(T);
  const bool strips = plane_bytes >= 64 && (plane_bytes & (plane_bytes - 1)) == 0;
  at::parallel_for(0, B * nblocks, grain, [&](int64_t begin, int64_t end) {
    const T* rows[P];
    std::vector<const T*> all_rows(strips ? L : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks;
      const int64_t c0 = (task % nblocks) * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      T* planes = dst + elem_offset(true, b, 0, 0, L, C);
      if (strips) {
        // Channel strips outer: the writes run through 8 whole consecutive planes at a time, one
        // sequential stream. Position tiles outer write one line into each of 128 planes a power of
        // two apart (the same few cache sets; DRAM banks when streaming), which ran slower here
        // (interleaved A/B, OSTrack-256: B=32 bf16 440-540 µs vs 330-380 µs, fp32 880-930 µs vs
        // 650-680 µs; B=1 fp32 33 µs vs 21-28 µs, bf16 14-19 µs vs 15-23 µs).
        for (int64_t p = 0; p < L; ++p) {
          const int32_t s = inv[b * L + p];
          all_rows[p] = s >= 0 ? src + b * sb + s * st : zeros.data();
          if (s >= 0) prefetch_bytes(all_rows[p] + c0, (c1 - c0) * sizeof(T));
        }
        for (int64_t c = c0; c < c1; c += 8) {
          const int64_t ce = std::min(c1, c + 8);
          for (int64_t p0 = 0; p0 < L; p0 += P) {
            const T* const* tile = all_rows.data() + p0;
            int64_t cc = stream ? transpose_lines<true>(tile, c, ce, planes + p0, L)
                                : transpose_lines<false>(tile, c, ce, planes + p0, L);
            for (; cc < ce; ++cc) {
              T* d = planes + cc * L + p0;
              for (int64_t p = 0; p < P; ++p) d[p] = tile[p][cc];
            }
          }
        }
        continue;
      }
      for (int64_t p0 = 0; p0 < L; p0 += P) {
        const int64_t np = std::min(P, L - p0);
        for (int64_t p = 0; p < P; ++p) {
          const int32_t s = p < np ? inv[b * L + p0 + p] : kEmpty;
          rows[p] = s >= 0 ? src + b * sb + s * st : zeros.data();
        }
        // the next tile's source slices: rows in inverse-map order, which no prefetcher guesses
        if (stream) {
          for (int64_t p = p0 + P; p < std::min(L, p0 + 2 * P); ++p) {
            const int32_t s = inv[b * L + p];
            if (s >= 0) prefetch_bytes(src + b * sb + s * st + c0, (c1 - c0) * sizeof(T));
          }
        }
        int64_t c = c0;
        if (np == P) c = stream ? transpose_lines<true>(rows, c, c1, planes + p0, L)
                                : transpose_lines<false>(rows, c, c1, planes + p0, L);
        for (; c < c1; ++c) {
          T* d = planes + c * L + p0;
          for (int64_t p = 0; p < np; ++p) d[p] = rows[p][c];
        }
      }
    }
    if (stream) stream_fence();
  });
}

// Gather from planes: dst[b, j, c] = src[b·sb + c·sc + index[b, j]] (token stride 1). A task owns one
// batch and W channels, W·elem = one 64-byte line: it reads its W planes (W·N·elem bytes, L1-sized at
// tracker maps) and writes each output row's W channels as one whole line.
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
// scalar. When it runs: use_position_groups. GCC 12's _mm512_unpack* pass _mm512_undefined_epi32()
// as the unused merge source, which -Wmaybe-uninitialized reports at every call.
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
    transpose_lanes<sizeof(T)>(t);
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

// inv: the [B, N] inverse maps of `index` when use_position_groups, else nullptr.
template <typename T>
void planes_to_rows(const T* src, int64_t sb, int64_t sc, T* dst, const int64_t* index, const int32_t* inv,
                    int64_t B, int64_t k, int64_t N, int64_t C) {
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
            stream ? gather_lines_avx2<true>(planes, sc, idx, k, d, C, pf) : gather_lines_avx2<false>(planes, sc, idx, k, d, C, pf);
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

template <typename F>
void by_elem_size(const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, "fasttrack: unsupported element size ", t.element_size());
  }
}

}  // namespace

// Metadata checks shared with the CUDA binding (csrc/cuda/pad_scatter.cpp); the Python wrapper runs
// the same checks first, these guard direct torch.ops calls.
Problem check_gather_args(const at::Tensor& x, const at::Tensor& index, c10::string_view layout) {
  const char* op = "gather_tokens";
  const bool nchw = parse_layout(layout, op);
  TORCH_CHECK_VALUE(x.dim() == (nchw ? 4 : 3), "fasttrack.", op, ": `x` must have ", nchw ? 4 : 3,
                    " dims, got shape ", x.sizes());
  check_floating(x, op, "x");
  check_index_meta(index, x, op, "x");
  const int64_t N = nchw ? x.size(2) * x.size(3) : x.size(1);
  const int64_t C = nchw ? x.size(1) : x.size(2);
  TORCH_CHECK_VALUE(index.size(1) <= N, "fasttrack.", op, ": `index` selects ", index.size(1),
                    " tokens but `x` has only ", N);
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "fasttrack.", op, ": `x` has ", N,
                    " tokens, more than the 2^31 - 1 supported");
  return Problem{x.size(0), index.size(1), N, C, false, nchw};
}

Problem check_scatter_args(const at::Tensor& kept, const at::Tensor& index, int64_t length,
                           c10::string_view layout, at::IntArrayRef hw) {
  const char* op = "pad_scatter";
  const bool nchw = parse_layout(layout, op);
  TORCH_CHECK_VALUE(kept.dim() == 3, "fasttrack.", op, ": `kept` must have 3 dims, got shape ", kept.sizes());
  check_floating(kept, op, "kept");
  check_index_meta(index, kept, op, "kept");
  TORCH_CHECK_VALUE(index.size(1) == kept.size(1), "fasttrack.", op, ": `index` must have shape [",
                    kept.size(0), ", ", kept.size(1), "] (like `kept`), got ", index.sizes());
  TORCH_CHECK_VALUE(length >= kept.size(1) && length <= std::numeric_limits<int32_t>::max(), "fasttrack.", op,
                    ": `length` must be >= k=", kept.size(1), " (the number of kept tokens) and < 2^31, got ",
                    length);
  if (nchw) {
    // H * W compared without multiplying (it could wrap for huge H, W)
    TORCH_CHECK_VALUE(hw.size() == 2 && hw[0] >= 0 && hw[1] >= 0 &&
                          (hw[1] == 0 ? length == 0 : (length % hw[1] == 0 && hw[0] == length / hw[1])),
                      "fasttrack.", op,
                      ": `hw` must be (H, W) with H*W == length=", length, ", got ", hw);
  }
  return Problem{kept.size(0), kept.size(1), length, kept.size(2), true, nchw};
}

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& index_in, c10::string_view layout,
                             bool check_index) {
  (void)check_index;  // the CPU path always validates: see the top of this file
  const Problem pb = check_gather_args(x_in, index_in, layout);
  const at::Tensor index = index_in.contiguous();
  // Validation builds each row's inverse map: kept for the planes path's position groups, else one
  // reused row of scratch.
  const bool keep_inv = pb.nchw && use_position_groups(x_in.element_size(), pb.k, pb.length);
  std::vector<int32_t> inv(keep_inv ? pb.batch * pb.length : pb.length);
  check_rows("gather_tokens", index.const_data_ptr<int64_t>(), pb.batch, pb.k, pb.length, inv.data(), keep_inv);

  at::Tensor out = empty_output({pb.batch, pb.k, pb.channels}, x_in.options());
  if (out.numel() == 0) return out;
  // The source is (batch, token, channel) with strides (sb, st, sc) whatever the layout: rows when the
  // channels are contiguous (tokens layout, or a channels_last NCHW map), planes when the tokens are
  // (NCHW, or a transposed token map); anything else is copied once.
  int64_t sb = x_in.stride(0), st = 0, sc = x_in.stride(pb.nchw ? 1 : 2);
  bool flat = true;  // tokens reachable with one stride
  if (!pb.nchw) {
    st = x_in.stride(1);
  } else if (x_in.size(3) == 1) {
    st = x_in.stride(2);
  } else {
    st = x_in.stride(3);
    flat = x_in.size(2) == 1 || x_in.stride(2) == x_in.size(3) * st;
  }
  bool rows = flat && (sc == 1 || pb.channels == 1);
  at::Tensor x = x_in;
  if (!rows && !(flat && (st == 1 || pb.length == 1))) {
    x = x_in.contiguous();
    sb = x.stride(0);
    rows = !pb.nchw;
    st = rows ? pb.channels : 1;
    sc = rows ? 1 : pb.length;
  }
  by_elem_size(x, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x.const_data_ptr());
    T* dst = static_cast<T*>(out.mutable_data_ptr());
    const int64_t* idx = index.const_data_ptr<int64_t>();
    if (rows) {
      rows_to_rows(src, sb, st, dst, idx, pb.batch, pb.k, pb.channels);
    } else {
      planes_to_rows(src, sb, sc, dst, idx, keep_inv ? inv.data() : nullptr, pb.batch, pb.k, pb.length, pb.channels);
    }
  });
  return out;
}

at::Tensor pad_scatter_cpu(const at::Tensor& kept_in, const at::Tensor& index_in, int64_t length,
                           c10::string_view layout, at::IntArrayRef hw, bool check_index) {
  (void)check_index;
  const Problem pb = check_scatter_args(kept_in, index_in, length, layout, hw);
  const at::Tensor index = index_in.contiguous();
  std::vector<int32_t> inv(pb.batch * pb.length);
  check_rows("pad_scatter", index.const_data_ptr<int64_t>(), pb.batch, pb.k, pb.length, inv.data(), true);

  at::Tensor out = pb.nchw ? empty_output({pb.batch, pb.channels, hw[0], hw[1]}, kept_in.options())
                           : empty_output({pb.batch, pb.length, pb.channels}, kept_in.options());
  if (out.numel() == 0) return out;
  // Rows only need unit channel stride: the tracker's kept tokens are often a slice x[:, lens_t:].
  const at::Tensor kept = kept_in.stride(2) == 1 ? kept_in : kept_in.contiguous();
  by_elem_size(kept, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(kept.const_data_ptr());
    T* dst = static_cast<T*>(out.mutable_data_ptr());
    if (pb.nchw) {
      rows_to_planes(src, kept.stride(0), kept.stride(1), dst, inv.data(), pb.batch, pb.length, pb.channels);
    } else {
      rows_to_rows(src, kept.stride(0), kept.stride(1), dst, inv.data(), pb.batch, pb.length, pb.channels);
    }
  });
  return out;
}

}  // namespace pad_scatter
}  // namespace fasttrack

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("gather_tokens(Tensor x, Tensor index, str layout=\"tokens\", bool check_index=True) -> Tensor");
  m.def("pad_scatter(Tensor kept, Tensor index, int length, str layout=\"tokens\", int[] hw=[], bool check_index=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) {
  m.impl("gather_tokens", &fasttrack::pad_scatter::gather_tokens_cpu);
  m.impl("pad_scatter", &fasttrack::pad_scatter::pad_scatter_cpu);
}
