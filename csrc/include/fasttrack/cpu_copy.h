// Row copies for the CPU kernels (host only).
//
// Token rows are a few KB: glibc's memcpy takes its `rep movsb` path there, which on this project's
// AMD machine ran up to half the speed of plain 32-byte vector moves (256 rows of 3 KB on one core,
// 20 µs vs 10 µs). The extension is built for baseline x86-64, so the AVX2 loop is picked at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fasttrack/cpu_isa.h"  // FT_HAVE_AVX2_PATH, kHasAvx2

namespace fasttrack {

// Outputs larger than this are written with streaming (non-temporal) stores: they would not stay
// in the 32 MiB last-level cache anyway, and plain stores first read every destination line (for a
// B=32 OSTrack-384 token gather, 54 MB more traffic than the copy itself).
constexpr size_t kStreamBytes = size_t{16} << 20;

#if defined(FT_HAVE_AVX2_PATH)
// d must be 32-byte aligned.
__attribute__((target("avx2"))) inline void stream_bytes_avx2(char* d, const char* s, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
  if (i < n) std::memcpy(d + i, s + i, n - i);
}

__attribute__((target("avx2"))) inline void copy_bytes_avx2(char* d, const char* s, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
  if (i < n) std::memcpy(d + i, s + i, n - i);
}
#endif

// stream: the caller's whole output exceeds kStreamBytes; it must call stream_fence() after its
// copies (streaming stores are weakly ordered) and before another thread may read them.
inline void copy_bytes(void* d, const void* s, size_t n, bool stream = false) {
#if defined(FT_HAVE_AVX2_PATH)
  if (kHasAvx2) {
    if (stream && reinterpret_cast<uintptr_t>(d) % 32 == 0) {
      return stream_bytes_avx2(static_cast<char*>(d), static_cast<const char*>(s), n);
    }
    return copy_bytes_avx2(static_cast<char*>(d), static_cast<const char*>(s), n);
  }
#endif
  std::memcpy(d, s, n);
}

// Requests the lines of [p, p + n) (the next rows of a copy in an order hardware prefetchers miss).
inline void prefetch_bytes(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
}

inline void stream_fence() {
#if defined(FT_HAVE_AVX2_PATH)
  _mm_sfence();
#endif
}

}  // namespace fasttrack
