// fasttrack::topk_select / fasttrack::topk_select_qk, CPU kernel (schema and argument checks:
// csrc/topk_select.cpp).
//
// Semantics: fasttrack/reference.py::topk_select. The scores are reduced in the reference's order
// (per head: sum over rows, / R; then sum over heads, / H; + bonus), all in float32, so inputs whose
// partial sums are exact give bit-identical scores and therefore identical selections, ties included.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include <fasttrack/cpu_copy.h>
#include <fasttrack/cpu_simd.h>
#include <fasttrack/output_cache.h>
#include <fasttrack/topk_select.h>

namespace fasttrack {
namespace topk_select {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Ascending order of the key = descending score, then ascending index. Every NaN ranks first and
// -0 ties with +0, as in torch.sort(descending=True, stable=True), which the reference uses.
inline uint64_t rank_key(float s, uint32_t l) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    bits = 0x7fc00000u;
  } else if (bits == 0x80000000u) {
    bits = 0u;
  }
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | l;
}

// Candidates are scored in chunks of columns: each column's reduction runs in the same order
// (heads, then rows) whichever chunk or thread computes it, so the chunking never changes a score.
// Narrow chunks spread a B = 1 call over the threads; with a batch row per thread, a chunk is the whole
// candidate range, so every attention row is read once, front to back (kChunk-wide chunks walk each
// row R·H times in 256-byte pieces, which the prefetcher follows badly at B = 32).
constexpr int64_t kChunk = 64;

int64_t chunk_width(int64_t B, int64_t L) { return B >= at::get_num_threads() ? L : std::min(L, kChunk); }

// head[j] += (w ·) a[j] for j < n: the hot loop when R > 1 (all template rows: R·H rows per column).
// Multiply then add, never fused, so every build computes the same bits; float32 and bfloat16 also
// get an AVX2 version (the extension is built for baseline x86-64), picked at run time.
template <typename T>
inline void accumulate_row_base(float* __restrict__ head, const T* __restrict__ a, const float* w, int64_t n) {
  if (w == nullptr) {
    for (int64_t j = 0; j < n; ++j) head[j] += static_cast<float>(a[j]);
  } else {
    const float wr = *w;
    for (int64_t j = 0; j < n; ++j) head[j] += wr * static_cast<float>(a[j]);
  }
}

#if defined(FT_HAVE_AVX2_PATH)
template <typename T>
__attribute__((target("avx2"))) inline __m256 load8_as_float(const T* a) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(a);
  } else {
    return simd::load_bf16x8(reinterpret_cast<const uint16_t*>(a));
  }
}

// Four rows at once: head[j] = (((head[j] + a0[j]) + a1[j]) + a2[j]) + a3[j], the same additions in
// the same order as four single-row calls, with head kept in a register between them.
template <typename T>
__attribute__((target("avx2"))) void accumulate_rows4_avx2(float* __restrict__ head, const T* const* a, const float* w,
                                                           int64_t n) {
  int64_t j = 0;
  if (w == nullptr) {
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_loadu_ps(head + j);
      for (int r = 0; r < 4; ++r) v = _mm256_add_ps(v, load8_as_float(a[r] + j));
      _mm256_storeu_ps(head + j, v);
    }
  } else {
    __m256 wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = _mm256_set1_ps(w[r]);
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_loadu_ps(head + j);
      for (int r = 0; r < 4; ++r) v = _mm256_add_ps(v, _mm256_mul_ps(wr[r], load8_as_float(a[r] + j)));
      _mm256_storeu_ps(head + j, v);
    }
  }
  for (int r = 0; r < 4; ++r) accumulate_row_base(head + j, a[r] + j, w == nullptr ? nullptr : w + r, n - j);
}

template <typename T>
__attribute__((target("avx2"))) void accumulate_row_avx2(float* __restrict__ head, const T* __restrict__ a,
                                                         const float* w, int64_t n) {
  int64_t j = 0;
  if (w == nullptr) {
    for (; j + 8 <= n; j += 8) {
      _mm256_storeu_ps(head + j, _mm256_add_ps(_mm256_loadu_ps(head + j), load8_as_float(a + j)));
    }
  } else {
    const __m256 wr = _mm256_set1_ps(*w);
    for (; j + 8 <= n; j += 8) {
      _mm256_storeu_ps(head + j, _mm256_add_ps(_mm256_loadu_ps(head + j), _mm256_mul_ps(wr, load8_as_float(a + j))));
    }
  }
  accumulate_row_base(head + j, a + j, w, n - j);
}
#endif

template <typename T>
inline void accumulate_row(float* head, const T* a, const float* w, int64_t n) {
#if defined(FT_HAVE_AVX2_PATH)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (kHasAvx2) return accumulate_row_avx2(head, a, w, n);
  }
#endif
  accumulate_row_base(head, a, w, n);
}

// score[l] for l in [l0, l1) of batch row b: the sum over heads of (the sum over rows of w_r *
// row_r[l]) / R, then / H, + bonus. `row(h, r)` points at candidate 0 of query row r of head h.
template <typename T, typename RowFn>
void score_candidates(const Problem& p, int64_t b, int64_t H, RowFn row, int64_t l0, int64_t l1, float* score) {
  const int64_t R = p.R, n = l1 - l0;
  const float* w = p.query_weight.defined() ? p.query_weight.data_ptr<float>() + b * R : nullptr;
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < 2 * n) scratch.resize(2 * n);
  float* __restrict__ acc = scratch.data();
  float* __restrict__ head = acc + n;
  std::fill(acc, acc + n, 0.f);
  const float fr = static_cast<float>(R);
  for (const auto h : c10::irange(H)) {
    std::fill(head, head + n, 0.f);
    int64_t r = 0;
#if defined(FT_HAVE_AVX2_PATH)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      if (kHasAvx2) {
        for (; r + 4 <= R; r += 4) {
          const T* a[4] = {row(h, r) + l0, row(h, r + 1) + l0, row(h, r + 2) + l0, row(h, r + 3) + l0};
          // the next four rows: measured 20-25% faster at B=32, R=64 (the loads wait on memory otherwise)
          if (r + 8 <= R) {
            for (int q = 4; q < 8; ++q) prefetch_bytes(row(h, r + q) + l0, n * sizeof(T));
          }
          accumulate_rows4_avx2(head, a, w == nullptr ? nullptr : w + r, n);
        }
      }
    }
#endif
    for (; r < R; ++r) accumulate_row(head, row(h, r) + l0, w == nullptr ? nullptr : w + r, n);
    for (int64_t j = 0; j < n; ++j) acc[j] += head[j] / fr;
  }
  const float fh = static_cast<float>(H);
  const float* bo = p.bonus.defined() ? p.bonus.data_ptr<float>() + b * p.L + l0 : nullptr;
  for (int64_t j = 0; j < n; ++j) score[l0 + j] = bo ? acc[j] / fh + bo[j] : acc[j] / fh;
}

// Top-k of one row: nth_element splits kept from removed, then each part is sorted because both
// outputs are in descending score order (the spec); no sort ever spans both parts.
void select_row(const Problem& p, int64_t b, const float* score, uint64_t* keys, int64_t* keep, int64_t* removed) {
  const int64_t L = p.L, K = p.K;
  for (int64_t l = 0; l < L; ++l) keys[l] = rank_key(score[l], static_cast<uint32_t>(l));
  std::nth_element(keys, keys + K, keys + L);
  std::sort(keys, keys + K);
  std::sort(keys + K, keys + L);
  for (int64_t j = 0; j < K; ++j) keep[b * K + j] = static_cast<int64_t>(keys[j] & 0xffffffffu);
  for (int64_t j = K; j < L; ++j) removed[b * (L - K) + j - K] = static_cast<int64_t>(keys[j] & 0xffffffffu);
}

void map_global(const Problem& p, int64_t b, int64_t n, const int64_t* local, int64_t* out) {
  const int64_t* g = p.global_index.defined() ? p.global_index.data_ptr<int64_t>() + b * p.L : nullptr;
  for (int64_t j = 0; j < n; ++j) out[b * n + j] = g ? g[local[b * n + j]] : local[b * n + j];
}

// tokens[b] = cat(x[b, :start], x[b, start + keep], x[b, start + L:]), row by row as raw bytes. The
// rows are independent, so they are split over threads even for B = 1 (the copy is most of the op's
// time), but only in chunks of >= 256 KB: below that a fork/join costs more than it saves.
void gather_tokens(const Problem& p, const int64_t* keep, char* out) {
  const int64_t row = p.C * p.x.element_size();
  const int64_t M = p.N - p.L + p.K;
  const int64_t start = p.start, K = p.K, L = p.L, N = p.N;
  const char* x = static_cast<const char*>(p.x.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(row, 1));
  const bool stream = static_cast<size_t>(p.B * M * row) > kStreamBytes;
  auto source = [&](int64_t i) {
    const int64_t b = i / M, o = i % M;
    return x + (b * N + (o < start ? o : (o < start + K ? start + keep[b * K + o - start] : o - K + L))) * row;
  };
  constexpr int64_t kAhead = 4;  // rows: the kept rows come in score order, which no prefetcher guesses
  auto body = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (stream && i + kAhead < i1) prefetch_bytes(source(i + kAhead), row);
      copy_bytes(out + i * row, source(i), row, stream);
    }
    if (stream) stream_fence();
  };
  at::parallel_for(0, p.B * M, grain, body);
}

// Shared tail of both ops. `score_cols(b, l0, l1, score)` fills score[l0, l1) of batch row b;
// `column_cost` (elements it reads per column) sizes the parallel chunks.
template <typename ScoreFn>
Outputs select_and_gather(const Problem& p, int64_t column_cost, ScoreFn score_cols) {
  const int64_t B = p.B, L = p.L, K = p.K;
  auto idx = p.x.options().dtype(at::kLong);
  Tensor tokens = empty_output({B, p.N - L + K, p.C}, p.x.options());
  Tensor keep = at::empty({B, K}, idx), removed = at::empty({B, L - K}, idx);
  Tensor keep_g = at::empty({B, K}, idx), removed_g = at::empty({B, L - K}, idx);
  int64_t* kp = keep.data_ptr<int64_t>();
  int64_t* rp = removed.data_ptr<int64_t>();
  int64_t* kg = keep_g.data_ptr<int64_t>();
  int64_t* rg = removed_g.data_ptr<int64_t>();
  std::vector<float> scores(K == L ? 0 : B * L);  // k == L: nothing removed, no score needed
  if (K != L) {
    const int64_t cw = chunk_width(B, L), chunks = (L + cw - 1) / cw;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(column_cost * cw, 1));
    at::parallel_for(0, B * chunks, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / chunks, l0 = (i % chunks) * cw;
        score_cols(b, l0, std::min(L, l0 + cw), scores.data() + b * L);
      }
    });
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys(K == L ? 0 : L);
    for (int64_t b = b0; b < b1; ++b) {
      if (K == L) {  // the official code returns its input untouched
        for (int64_t l = 0; l < L; ++l) kp[b * L + l] = l;
      } else {
        select_row(p, b, scores.data() + b * L, keys.data(), kp, rp);
        map_global(p, b, L - K, rp, rg);
      }
      map_global(p, b, K, kp, kg);
    }
  });
  gather_tokens(p, kp, static_cast<char*>(tokens.data_ptr()));
  return {tokens, keep, removed, keep_g, removed_g};
}

Outputs topk_select_cpu(const Tensor& attn, const Tensor& x, const Tensor& query_index,
                        const std::optional<Tensor>& query_weight, const std::optional<Tensor>& bonus,
                        const std::optional<Tensor>& global_index, int64_t start, int64_t length, double keep_ratio) {
  const Problem p =
      check_topk_select_args(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio);
  // Only R·L elements per head are read, so strided batch/head/row dims cost nothing; a strided
  // last dim would defeat the vector loop, and is rare enough to pay one copy for.
  const Tensor a = attn.stride(3) == 1 ? attn : attn.contiguous();
  const int64_t H = a.size(1), sb = a.stride(0), sh = a.stride(1), sn = a.stride(2);
  const int64_t* qi = p.query_index.data_ptr<int64_t>();
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "topk_select_cpu", [&] {
    const scalar_t* base = a.data_ptr<scalar_t>() + start;
    out = select_and_gather(p, H * p.R, [&](int64_t b, int64_t l0, int64_t l1, float* score) {
      const int64_t* q = qi + b * p.R;
      score_candidates<scalar_t>(
          p, b, H, [&](int64_t h, int64_t r) { return base + b * sb + h * sh + q[r] * sn; }, l0, l1, score);
    });
  });
  return out;
}

Outputs topk_select_qk_cpu(const Tensor& q, const Tensor& k, const Tensor& x, const Tensor& query_index,
                           const std::optional<Tensor>& query_weight, const std::optional<Tensor>& bonus,
                           const std::optional<Tensor>& global_index, int64_t start, int64_t length, double keep_ratio,
                           double scale) {
  const Problem p =
      check_topk_select_qk_args(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio);
  const int64_t B = p.B, H = q.size(1), N = p.N, R = p.R;
  if (p.K == p.L) {  // the scores are not needed
    return select_and_gather(p, 0, [](int64_t, int64_t, int64_t, float*) {});
  }
  // Only the R query rows go through the GEMM and softmax; they are the reference's own ATen calls
  // (fp32 logits, scaled after the product) so the probabilities match it bit for bit.
  const Tensor rows_index = p.query_index.view({B, 1, R, 1}).expand({B, H, R, q.size(3)});
  const Tensor qr = q.gather(2, rows_index).to(at::kFloat);  // gather first: converts R rows, not N
  const Tensor logits = at::matmul(qr, k.to(at::kFloat).transpose(-1, -2)).mul_(scale);
  const Tensor probs = at::softmax(logits, -1);  // [B, H, R, N], contiguous
  const float* base = probs.data_ptr<float>() + start;
  return select_and_gather(p, H * R, [&](int64_t b, int64_t l0, int64_t l1, float* score) {
    score_candidates<float>(
        p, b, H, [&](int64_t h, int64_t r) { return base + ((b * H + h) * R + r) * N; }, l0, l1, score);
  });
}

}  // namespace
}  // namespace topk_select
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) {
  m.impl("topk_select", &fasttrack::topk_select::topk_select_cpu);
  m.impl("topk_select_qk", &fasttrack::topk_select::topk_select_qk_cpu);
}
