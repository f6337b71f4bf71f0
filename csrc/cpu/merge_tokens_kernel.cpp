// fasttrack::merge_tokens / fasttrack::cosine_argmax, CPU kernels (schema and argument checks:
// csrc/merge_tokens.cpp).
//
// Contract: fasttrack/reference.py::merge_tokens / cosine_argmax. The CPU kernel works in the
// "opmath" type (fp32 for fp16/bf16/fp32 inputs, as the spec; fp64 for fp64 inputs, so gradcheck's
// finite differences see the op at double precision). Every step is run-to-run deterministic:
// a stable sort for the ranking, a first-maximum scan for the argmax, and each target summing its
// sources in source order (no races on the output).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <fasttrack/cpu_isa.h>
#include <fasttrack/merge_tokens.h>
#include <fasttrack/output_cache.h>

namespace fasttrack {
namespace merge_tokens {
namespace {

// Python's max(1, math.floor(r * n)) in the same double arithmetic, so K always agrees with Python.
int64_t merge_count(double r, int64_t n) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::floor(r * static_cast<double>(n))));
}

// Row kernels. The extension is built for the baseline ISA (it must load on any edge CPU), so the
// float versions are also compiled for AVX2+FMA and AVX-512 and picked once from the CPU's features.
// Independent partial sums let gcc vectorise the reductions without -ffast-math; the result is the
// same every run on a given machine.
template <typename T>
inline __attribute__((always_inline)) T dot_body(const T* x, const T* y, int64_t n) {
  constexpr int W = 32;
  T a[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) a[j] += x[i + j] * y[i + j];
  T s = 0;
  for (int j = 0; j < W; ++j) s += a[j];
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <typename T>
inline __attribute__((always_inline)) void add_body(T* o, const T* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) o[c] += y[c];
}

float dot_base(const float* x, const float* y, int64_t n) { return dot_body(x, y, n); }
__attribute__((target("avx2,fma"))) float dot_avx2(const float* x, const float* y, int64_t n) {
  return dot_body(x, y, n);
}
__attribute__((target("avx512f,fma"))) float dot_avx512(const float* x, const float* y, int64_t n) {
  return dot_body(x, y, n);
}
void add_base(float* o, const float* y, int64_t n) { add_body(o, y, n); }
__attribute__((target("avx2,fma"))) void add_avx2(float* o, const float* y, int64_t n) { add_body(o, y, n); }
__attribute__((target("avx512f,fma"))) void add_avx512(float* o, const float* y, int64_t n) { add_body(o, y, n); }

double dot(const double* x, const double* y, int64_t n) { return dot_body(x, y, n); }
float dot(const float* x, const float* y, int64_t n) {
  static const auto fn = cpu_isa() == CpuIsa::avx512 ? dot_avx512 : cpu_isa() == CpuIsa::avx2 ? dot_avx2 : dot_base;
  return fn(x, y, n);
}
void add_row(double* o, const double* y, int64_t n) { add_body(o, y, n); }
void add_row(float* o, const float* y, int64_t n) {
  static const auto fn = cpu_isa() == CpuIsa::avx512 ? add_avx512 : cpu_isa() == CpuIsa::avx2 ? add_avx2 : add_base;
  fn(o, y, n);
}

// 1/||row|| from its squared norm; a zero row keeps scale 1, so it stays zero and its cosine with
// anything is 0 (reference._unit). A row with a NaN or infinite entry scales to NaN: its cosine
// with anything is NaN, as the spec's x / ||x|| gives.
template <typename T>
T inv_norm(T sq) {
  const T n = std::sqrt(sq);
  if (!std::isfinite(n)) return std::numeric_limits<T>::quiet_NaN();
  return n > T(0) ? T(1) / n : T(1);
}

// For each row r, the first k < cols maximising value(r, k) (ties -> lower k, as the spec); NaN
// values never win, and a row whose values are all NaN (or whose row_scale is NaN) gets k = 0 and a
// NaN maximum (reference.cosine_argmax). best gets the maximum times row_scale[r] when asked for.
template <typename T, typename Value>
void first_argmax(int64_t rows, int64_t cols, Value value, const T* row_scale, float* best, int64_t* arg) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T m = -std::numeric_limits<T>::infinity();
      int64_t idx = 0;
      bool found = false;
      if (!row_scale || !std::isnan(row_scale[r])) {
        for (int64_t k = 0; k < cols; ++k) {
          const T v = value(r, k);
          if (v > m || (!found && v == m)) {
            m = v;
            idx = k;
            found = true;
          }
        }
      }
      if (best) best[r] = found ? static_cast<float>(m * row_scale[r]) : std::numeric_limits<float>::quiet_NaN();
      arg[r] = idx;
    }
  });
}

at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Raw dot products of every row of a [R, Cm] with every row of b [Q, Cm]: [R, Q] contiguous. Float32
// goes through oneDNN's GEMM (`mkldnn::_linear_pointwise`, b as the weight) when the torch build has
// it: on this project's AMD machine PyTorch's BLAS (MKL) runs these shapes at ~180 GFLOP/s and oneDNN
// at ~400. Builds without oneDNN, and float64, use at::mm. Rows are already contiguous here.
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) {
  static const auto onednn = [] {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return h.has_value() && at::hasMKLDNN()
               ? std::optional<c10::TypedOperatorHandle<at::Tensor(
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                     c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>>(
                     h->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>())
               : std::nullopt;
  }();
  if (onednn && a.scalar_type() == at::kFloat && a.size(0) > 0 && b.size(0) > 0 && a.size(1) > 0) {
    return onednn->call(a, b, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), "");
  }
  return at::mm(a, b.t());
}

at::Tensor score_gemv(const at::Tensor& rows, const at::Tensor& v) {
  const int64_t M = rows.size(0), threads = at::get_num_threads();
  const int64_t block = std::max<int64_t>(64, (M + threads * 64 - 1) / (threads * 64) * 64);
  if (threads == 1 || M <= block) return at::mv(rows, v);
  at::Tensor out = at::empty({M}, rows.options());
  // Blocks are copied in by hand, not written with mv_out: under torch.inference_mode `out` is an
  // inference tensor, and the worker threads may not write into one through ATen.
  char* dst = static_cast<char*>(out.data_ptr());
  const size_t elem = out.element_size();
  at::parallel_for(0, (M + block - 1) / block, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r0 = i * block, r1 = std::min(M, r0 + block);
      const at::Tensor part = at::mv(rows.slice(0, r0, r1), v).contiguous();
      std::memcpy(dst + r0 * elem, part.data_ptr(), (r1 - r0) * elem);
    }
  });
  return out;
}

// row_dots per batch row: a [B, R, Cm], b [B, Q, Cm] -> B tensors [R, Q].
std::vector<at::Tensor> batched_row_dots(const at::Tensor& a, const at::Tensor& b) {
  std::vector<at::Tensor> out;
  out.reserve(a.size(0));
  for (int64_t i = 0; i < a.size(0); ++i) out.push_back(row_dots(a[i], b[i]).contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_tokens_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& score, const std::optional<at::Tensor>& proj,
    const std::optional<at::Tensor>& metric, double keep_ratio, c10::string_view reduce) {
  check_merge_tokens_args(z, score, proj, metric, keep_ratio, reduce);
  const int64_t B = z.size(0), N = z.size(1), C = z.size(2);

  // The ATen calls below are this kernel's internals: its gradient is the op's registered formula.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t K = merge_count(keep_ratio, N), S = N - K;
  const bool mean = reduce == "mean";
  const auto acc = opmath(z.scalar_type());
  const auto idx_opts = z.options().dtype(at::kLong);
  at::Tensor zf = z.to(acc).contiguous();
  at::Tensor mf = metric ? metric->to(acc).contiguous() : zf;
  at::Tensor pf = proj ? proj->to(acc).contiguous() : at::Tensor();
  // The score through the same BLAS gemv as the spec's `z @ proj`: near-equal scores then rank
  // exactly as in the reference (a different summation order could swap them). BLAS runs one gemv
  // on one thread; split into blocks of 64 rows (a multiple of the gemv's row blocking, so every row
  // keeps its bits: tests compare the ranking with the reference's) it runs on all of them.
  at::Tensor sf = proj ? score_gemv(zf.view({B * N, C}), pf).view({B, N}) : score->to(acc).contiguous();
  const int64_t Cm = mf.size(2);

  at::Tensor tgt = at::empty({B, K}, idx_opts), src = at::empty({B, S}, idx_opts);
  at::Tensor assignment = at::empty({B, S}, idx_opts);
  at::Tensor out = empty_output({B, K, C}, zf.options());
  std::atomic<bool> nan{false};

  AT_DISPATCH_FLOATING_TYPES(acc, "merge_tokens_cpu", [&] {
    using T = scalar_t;
    // One batch row, start to finish: rank, match, merge. With at least a row per thread the rows run
    // in parallel and each one's z (~1 MB at T=5, L=64) stays in cache from the similarity GEMM to the
    // merge; below that (B = 1 tracking) the loops inside a row take the threads instead (parallel
    // loops and oneDNN run single-threaded inside a parallel region).
    auto merge_row = [&](int64_t b) {
      const T* zb = zf.data_ptr<T>() + b * N * C;
      const T* mb = mf.data_ptr<T>() + b * N * Cm;
      const T* sb = sf.data_ptr<T>() + b * N;
      int64_t* tp = tgt.data_ptr<int64_t>() + b * K;
      int64_t* sp = src.data_ptr<int64_t>() + b * S;
      int64_t* ap = assignment.data_ptr<int64_t>() + b * S;
      for (int64_t i = 0; i < N; ++i) {
        if (std::isnan(sb[i])) {
          nan = true;
          return;
        }
      }
      std::vector<int64_t> order(N);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [sb](int64_t i, int64_t j) { return sb[i] > sb[j]; });
      std::copy(order.begin(), order.begin() + K, tp);
      std::copy(order.begin() + K, order.end(), sp);
      if (S > 0) {
        // The argmax over targets of (s . t) / ||t|| is the cosine argmax: the source's own norm is
        // a positive constant per row (a zero source scores 0 everywhere and takes slot 0, as the
        // spec). The similarity GEMM runs on raw rows; when few tokens are sources it multiplies them
        // against every token in place rather than copying the targets out first.
        const bool all_columns = S * (N - K) <= 8 * K;
        std::vector<T> inv(N);  // 1/||metric row||, only for the columns the argmax reads
        at::parallel_for(0, all_columns ? N : K, std::max<int64_t>(1, 16384 / std::max<int64_t>(Cm, 1)),
                         [&](int64_t lo, int64_t hi) {
                           for (int64_t i = lo; i < hi; ++i) {
                             const int64_t row = all_columns ? i : tp[i];
                             inv[row] = inv_norm(dot(mb + row * Cm, mb + row * Cm, Cm));
                           }
                         });
        auto gather = [&](const int64_t* rows, int64_t R) {
          at::Tensor g = at::empty({R, Cm}, mf.options());
          T* gp = g.data_ptr<T>();
          for (int64_t r = 0; r < R; ++r) std::copy_n(mb + rows[r] * Cm, Cm, gp + r * Cm);
          return g;
        };
        const at::Tensor sim = row_dots(gather(sp, S), all_columns ? mf[b] : gather(tp, K)).contiguous();
        const T* simp = sim.data_ptr<T>();
        const int64_t ld = sim.size(1);  // N or K
        // a source row with a NaN / infinite entry has NaN similarities (the spec): target slot 0
        std::vector<T> src_scale(S);
        for (int64_t r = 0; r < S; ++r) src_scale[r] = inv_norm(dot(mb + sp[r] * Cm, mb + sp[r] * Cm, Cm));
        if (all_columns) {
          first_argmax<T>(
              S, K, [&](int64_t r, int64_t k) { return simp[r * ld + tp[k]] * inv[tp[k]]; }, src_scale.data(), nullptr,
              ap);
        } else {
          first_argmax<T>(
              S, K, [&](int64_t r, int64_t k) { return simp[r * ld + k] * inv[tp[k]]; }, src_scale.data(), nullptr, ap);
        }
      }
      // Sources grouped by target (a stable counting sort): each target then sums its own sources in
      // source order, so the parallel loop below has no shared writes.
      std::vector<int64_t> start(K + 1, 0), members(S), fill(K);
      for (int64_t i = 0; i < S; ++i) ++start[ap[i] + 1];
      for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
      std::copy_n(start.begin(), K, fill.begin());
      for (int64_t i = 0; i < S; ++i) members[fill[ap[i]]++] = i;
      T* ob = out.data_ptr<T>() + b * K * C;
      at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          T* o = ob + k * C;
          std::copy_n(zb + tp[k] * C, C, o);
          for (int64_t q = start[k]; q < start[k + 1]; ++q) add_row(o, zb + sp[members[q]] * C, C);
          if (mean) {
            const T cnt = static_cast<T>(1 + start[k + 1] - start[k]);
            for (int64_t c = 0; c < C; ++c) o[c] /= cnt;
          }
        }
      });
    };
    if (B >= at::get_num_threads()) {
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) merge_row(b);
      });
    } else {
      for (int64_t b = 0; b < B; ++b) merge_row(b);
    }
  });
  TORCH_CHECK_VALUE(!nan, "fasttrack.merge_tokens: ", proj ? "the score `z @ proj` (from `z` or `proj`)" : "`score`",
                    " contains NaN: the ranking is undefined");
  return {out.to(z.scalar_type()), tgt, src, assignment};
}

std::tuple<at::Tensor, at::Tensor> cosine_argmax_cpu(const at::Tensor& src, const at::Tensor& dst) {
  check_cosine_argmax_args(src, dst);
  const int64_t B = src.size(0), S = src.size(1), T_ = dst.size(1), Cm = src.size(2);
  const auto acc = opmath(src.scalar_type());
  at::Tensor best = at::empty({B, S}, src.options().dtype(at::kFloat));
  at::Tensor arg = at::empty({B, S}, src.options().dtype(at::kLong));
  if (B * S == 0) return {best, arg};
  at::Tensor sf = src.to(acc).contiguous(), df = dst.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "cosine_argmax_cpu", [&] {
    using T = scalar_t;
    const T *a = sf.data_ptr<T>(), *d = df.data_ptr<T>();
    const int64_t ra = B * S, rows = B * S + B * T_;
    std::vector<T> inv(rows);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(Cm, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* row = r < ra ? a + r * Cm : d + (r - ra) * Cm;
        const T sq = dot(row, row, Cm);
        inv[r] = inv_norm(sq);
      }
    });
    const std::vector<at::Tensor> sims = batched_row_dots(sf, df);  // raw dot products, B × [S, T]
    std::vector<const T*> simp(B);
    for (int64_t b = 0; b < B; ++b) simp[b] = sims[b].data_ptr<T>();
    const T* inv_d = inv.data() + ra;
    first_argmax<T>(
        B * S, T_, [&](int64_t r, int64_t k) { return simp[r / S][(r % S) * T_ + k] * inv_d[(r / S) * T_ + k]; },
        inv.data(), best.data_ptr<float>(), arg.data_ptr<int64_t>());
  });
  return {best, arg};
}

}  // namespace
}  // namespace merge_tokens
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CPU, m) {
  m.impl("merge_tokens", &fasttrack::merge_tokens::merge_tokens_cpu);
  m.impl("cosine_argmax", &fasttrack::merge_tokens::cosine_argmax_cpu);
}
