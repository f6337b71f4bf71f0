// fasttrack::gather_tokens / fasttrack::pad_scatter, CPU kernel (schema and argument checks:
// csrc/pad_scatter.cpp; the gather from NCHW planes: csrc/cpu/gather_planes_kernel.cpp).
//
// Validate every index row first (range + duplicates, always: it costs O(B·L) int32 work against the
// O(B·L·C) copy, so `check_index` only matters on CUDA), then one pass over the output, parallel over
// batch × tokens, writing each output element once. Both ops are the "row map" of
// fasttrack/pad_scatter.h: gather maps through `index`, scatter through its inverse (kEmpty → zeros).
// The kernels move bytes, so they are instantiated per element size, not per dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <fasttrack/cpu_copy.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/output_cache.h>
#include <fasttrack/pad_scatter.h>

namespace fasttrack {
namespace pad_scatter {
namespace {

constexpr int64_t kChannelBlock = 128;  // channel planes per nchw scatter task (the unit of parallel work)
constexpr int64_t kAhead = 4;           // rows a large row copy prefetches ahead

// Row map, tokens layout: out row i = (b, r) is source row map[i] of batch b, or zeros.
// Source rows are contiguous (C elements), strided by sb / st elements; output contiguous.
template <typename T, typename MapT>
void rows_to_rows(const T* src, int64_t sb, int64_t st, T* dst, const MapT* map, int64_t B, int64_t R, int64_t C) {
  const size_t row_bytes = static_cast<size_t>(C) * sizeof(T);
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, C * sizeof(T)));
  const bool stream = static_cast<size_t>(B * R) * row_bytes > kStreamBytes;
  at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t s = map[i];
      if (s >= 0) {
        // the source rows come in map order, which no hardware prefetcher guesses
        const int64_t ahead = i + kAhead;
        if (stream && ahead < end && map[ahead] >= 0)
          prefetch_bytes(src + (ahead / R) * sb + map[ahead] * st, row_bytes);
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

// 4-byte elements on CPUs with AVX2 (chosen at run time: the extension is built for baseline x86-64):
// 8×8 transposes, half the stores of the SSE2 4×4 path.
#if defined(FT_HAVE_AVX2_PATH)
template <bool kStream, typename T>
__attribute__((target("avx2"))) int64_t transpose_lines_avx2(const T* const* rows, int64_t c, int64_t c1, T* planes,
                                                             int64_t L) {
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
      simd::Transpose<sizeof(T)>::run(r);
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
void rows_to_planes(const T* src, int64_t sb, int64_t st, T* dst, const int32_t* inv, int64_t B, int64_t L, int64_t C) {
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
        if (np == P)
          c = stream ? transpose_lines<true>(rows, c, c1, planes + p0, L)
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

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) {
  m.impl("gather_tokens", &fasttrack::pad_scatter::gather_tokens_cpu);
  m.impl("pad_scatter", &fasttrack::pad_scatter::pad_scatter_cpu);
}
