// fasttrack::topk_select / fasttrack::topk_select_qk: schema (kept identical to
// fasttrack/ops/topk_select.py; tests/test_registry.py compares them) and argument checks
// (fasttrack/topk_select.h). CPU kernel: csrc/cpu/topk_select_kernel.cpp.
#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include <fasttrack/checks.h>
#include <fasttrack/topk_select.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def(
      "topk_select(Tensor attn, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, Tensor? global_index, int start, int length, float keep_ratio) -> (Tensor tokens, Tensor keep_index, Tensor removed_index, Tensor keep_global, Tensor removed_global)");
  m.def(
      "topk_select_qk(Tensor q, Tensor k, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, Tensor? global_index, int start, int length, float keep_ratio, float scale) -> (Tensor tokens, Tensor keep_index, Tensor removed_index, Tensor keep_global, Tensor removed_global)");
}

namespace fasttrack {
namespace topk_select {
namespace {

using at::Tensor;

Problem check_common(const char* op, const Tensor& x, const Tensor& query_index,
                     const std::optional<Tensor>& query_weight, const std::optional<Tensor>& bonus,
                     const std::optional<Tensor>& global_index, int64_t start, int64_t length, double keep_ratio,
                     int64_t B, int64_t N, at::Device dev) {
  Problem p;
  p.op = op;
  TORCH_CHECK_VALUE(is_floating(x) && x.dim() == 3 && x.size(0) == B && x.size(1) == N, op,
                    ": `x` must be a floating [B=", B, ", N=", N, ", C] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == dev, op, ": `x` must be on ", dev, ", got ", x.device());
  TORCH_CHECK_VALUE(query_index.dim() == 2 && query_index.size(0) == B && query_index.size(1) >= 1 &&
                        query_index.scalar_type() == at::kLong && query_index.device() == dev,
                    op, ": `query_index` must be an int64 [B=", B, ", R>=1] tensor on ", dev, ", got ",
                    query_index.scalar_type(), " ", query_index.sizes());
  p.B = B;
  p.N = N;
  p.C = x.size(2);
  p.R = query_index.size(1);
  // compared without adding: start + length could wrap for start near 2^63
  TORCH_CHECK_VALUE(start >= 0 && length >= 1 && length <= N && start <= N - length, op,
                    ": need start >= 0, length >= 1 and `start + length` <= N=", N, ", got start=", start,
                    ", length=", length);
  TORCH_CHECK_VALUE(keep_ratio > 0.0 && keep_ratio <= 1.0, op, ": `keep_ratio` must be in (0, 1], got ", keep_ratio);
  p.start = start;
  p.L = length;
  // ceil in double precision, as reference.keep_count (OSTrack's math.ceil)
  p.K = static_cast<int64_t>(std::ceil(keep_ratio * static_cast<double>(length)));
  p.x = x.contiguous();
  p.query_index = query_index.contiguous();
  const int64_t* qi = p.query_index.data_ptr<int64_t>();
  for (const auto i : c10::irange(B * p.R)) {
    TORCH_CHECK_VALUE(qi[i] >= 0 && qi[i] < N, op, ": `query_index` values must be in [0, N=", N, "), got ", qi[i],
                      " at [", i / p.R, ", ", i % p.R, "]");
  }
  if (query_weight.has_value()) {
    const Tensor& w = *query_weight;
    TORCH_CHECK_VALUE(is_floating(w) && w.dim() == 2 && w.size(0) == B && w.size(1) == p.R && w.device() == dev, op,
                      ": `query_weight` must be a floating [B=", B, ", R=", p.R, "] tensor on ", dev, ", got ",
                      w.scalar_type(), " ", w.sizes());
    p.query_weight = w.to(at::kFloat).contiguous();
  }
  if (bonus.has_value()) {
    const Tensor& bo = *bonus;
    TORCH_CHECK_VALUE(is_floating(bo) && bo.dim() == 2 && bo.size(0) == B && bo.size(1) == length && bo.device() == dev,
                      op, ": `bonus` must be a floating [B=", B, ", L=", length, "] tensor on ", dev, ", got ",
                      bo.scalar_type(), " ", bo.sizes());
    p.bonus = bo.to(at::kFloat).contiguous();
  }
  if (global_index.has_value()) {
    const Tensor& g = *global_index;
    TORCH_CHECK_VALUE(
        g.scalar_type() == at::kLong && g.dim() == 2 && g.size(0) == B && g.size(1) == length && g.device() == dev, op,
        ": `global_index` must be an int64 [B=", B, ", L=", length, "] tensor on ", dev, ", got ", g.scalar_type(), " ",
        g.sizes());
    p.global_index = g.contiguous();
  }
  return p;
}

}  // namespace

Problem check_topk_select_args(const Tensor& attn, const Tensor& x, const Tensor& query_index,
                               const std::optional<Tensor>& query_weight, const std::optional<Tensor>& bonus,
                               const std::optional<Tensor>& global_index, int64_t start, int64_t length,
                               double keep_ratio) {
  const char* op = "fasttrack.topk_select";
  TORCH_CHECK_VALUE(is_floating(attn) && attn.dim() == 4 && attn.size(2) == attn.size(3), op,
                    ": `attn` must be a floating [B, H, N, N] tensor, got ", attn.scalar_type(), " ", attn.sizes());
  return check_common(op, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, attn.size(0),
                      attn.size(2), attn.device());
}

Problem check_topk_select_qk_args(const Tensor& q, const Tensor& k, const Tensor& x, const Tensor& query_index,
                                  const std::optional<Tensor>& query_weight, const std::optional<Tensor>& bonus,
                                  const std::optional<Tensor>& global_index, int64_t start, int64_t length,
                                  double keep_ratio) {
  const char* op = "fasttrack.topk_select_qk";
  TORCH_CHECK_VALUE(is_floating(q) && q.dim() == 4, op, ": `q` must be a floating [B, H, N, D] tensor, got ",
                    q.scalar_type(), " ", q.sizes());
  TORCH_CHECK_VALUE(is_floating(k) && k.sizes() == q.sizes() && k.device() == q.device(), op,
                    ": `k` must be a floating tensor of q's shape ", q.sizes(), ", got ", k.scalar_type(), " ",
                    k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": `k` must have q's dtype (", q.scalar_type(), "), got ",
                   k.scalar_type());
  return check_common(op, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, q.size(0),
                      q.size(2), q.device());
}

}  // namespace topk_select
}  // namespace fasttrack
