// fasttrack::merge_tokens / fasttrack::cosine_argmax: schema (kept identical to
// fasttrack/ops/merge_tokens.py; tests/test_registry.py compares them) and argument checks
// (fasttrack/merge_tokens.h). CPU kernels: csrc/cpu/merge_tokens_kernel.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include <fasttrack/checks.h>
#include <fasttrack/merge_tokens.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def(
      "merge_tokens(Tensor z, Tensor? score, Tensor? proj, Tensor? metric, float keep_ratio, str reduce=\"sum\") -> (Tensor merged, Tensor target_index, Tensor source_index, Tensor assignment)");
  m.def("cosine_argmax(Tensor src, Tensor dst) -> (Tensor max_similarity, Tensor argmax)");
}

namespace fasttrack {
namespace merge_tokens {

void check_merge_tokens_args(const at::Tensor& z, const std::optional<at::Tensor>& score,
                             const std::optional<at::Tensor>& proj, const std::optional<at::Tensor>& metric,
                             double keep_ratio, c10::string_view reduce) {
  for (const at::Tensor* t : {&z, score ? &*score : nullptr, proj ? &*proj : nullptr, metric ? &*metric : nullptr}) {
    TORCH_CHECK_TYPE(t == nullptr || is_floating(*t),
                     "fasttrack.merge_tokens: `z`, `score`, `proj` and `metric` "
                     "must be floating point, got ",
                     t ? t->scalar_type() : at::kFloat);
  }
  TORCH_CHECK_VALUE(z.dim() == 3, "fasttrack.merge_tokens: `z` must be [B, N, C]");
  const int64_t B = z.size(0), N = z.size(1), C = z.size(2);
  TORCH_CHECK_VALUE(score.has_value() != proj.has_value(),
                    "fasttrack.merge_tokens: give exactly one of `score` [B, N] and `proj` [C]");
  TORCH_CHECK_VALUE(!score || (score->dim() == 2 && score->size(0) == B && score->size(1) == N),
                    "fasttrack.merge_tokens: `score` must be [B, N]");
  TORCH_CHECK_VALUE(!proj || (proj->dim() == 1 && proj->size(0) == C), "fasttrack.merge_tokens: `proj` must be [C]");
  TORCH_CHECK_TYPE(!proj || proj->scalar_type() == z.scalar_type(),
                   "fasttrack.merge_tokens: `proj` must have z's "
                   "dtype (",
                   z.scalar_type(), "), got ", proj ? proj->scalar_type() : z.scalar_type());
  TORCH_CHECK_VALUE(!metric || (metric->dim() == 3 && metric->size(0) == B && metric->size(1) == N),
                    "fasttrack.merge_tokens: `metric` must be [B, N, Cm]");
  TORCH_CHECK_VALUE(keep_ratio > 0.0 && keep_ratio <= 1.0, "fasttrack.merge_tokens: `keep_ratio` must be in (0, 1]");
  TORCH_CHECK_VALUE(reduce == "sum" || reduce == "mean", "fasttrack.merge_tokens: `reduce` must be sum or mean");
  TORCH_CHECK_VALUE(N >= 1, "fasttrack.merge_tokens: `z` has no tokens");
}

void check_cosine_argmax_args(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK_TYPE(is_floating(src) && is_floating(dst),
                   "fasttrack.cosine_argmax: `src` and `dst` must be "
                   "floating point, got ",
                   src.scalar_type(), " and ", dst.scalar_type());
  TORCH_CHECK_VALUE(src.dim() == 3 && dst.dim() == 3 && src.size(0) == dst.size(0) && src.size(2) == dst.size(2),
                    "fasttrack.cosine_argmax: `src` [B, S, Cm] and `dst` [B, T, Cm] must agree in B and Cm");
  TORCH_CHECK_VALUE(dst.size(1) >= 1 || src.size(1) == 0, "fasttrack.cosine_argmax: `dst` has no rows");
  TORCH_CHECK_TYPE(src.scalar_type() == dst.scalar_type(), "fasttrack.cosine_argmax: `dst` must have src's dtype (",
                   src.scalar_type(), "), got ", dst.scalar_type());
}

}  // namespace merge_tokens
}  // namespace fasttrack
