// fasttrack::pruned_linear / fasttrack::_pruned_linear_gather: schema (kept identical to
// fasttrack/ops/pruned_linear.py; tests/test_registry.py compares them) and argument checks
// (fasttrack/pruned_linear.h). CPU kernel: csrc/cpu/pruned_linear_kernel.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include <fasttrack/checks.h>
#include <fasttrack/pruned_linear.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def(
      "pruned_linear(Tensor x, Tensor weight, Tensor? bias, Tensor in_index, Tensor? ln_weight=None, Tensor? ln_bias=None, float eps=1e-05, bool normalize=False) -> Tensor");
  m.def(
      "_pruned_linear_gather(Tensor x, Tensor in_index, Tensor? ln_weight=None, Tensor? ln_bias=None, float eps=1e-05, bool normalize=False) -> Tensor");
}

namespace fasttrack {
namespace pruned_linear {
namespace {

constexpr const char* kOp = "pruned_linear";

void check_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, int64_t n,
                  const at::Tensor& x) {
  if (!t.has_value()) return;
  check_floating(*t, op, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, "fasttrack.", op, ": `", name, "` must have shape [", n,
                    "], got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "fasttrack.", op, ": `", name, "` must be on ", x.device(),
                    " (like `x`), got ", t->device());
}

}  // namespace

void check_gather_args(const char* op, const at::Tensor& x, const at::Tensor& in_index,
                       const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                       bool normalize) {
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "fasttrack.", op, ": `x` must have at least one dim [..., d_in]");
  TORCH_CHECK_TYPE(in_index.scalar_type() == at::kLong, "fasttrack.", op, ": `in_index` must have dtype int64, got ",
                   in_index.scalar_type());
  TORCH_CHECK_VALUE(in_index.dim() == 1, "fasttrack.", op, ": `in_index` must have 1 dims, got shape ",
                    in_index.sizes());
  TORCH_CHECK_VALUE(in_index.device() == x.device(), "fasttrack.", op, ": `in_index` must be on ", x.device(),
                    " (like `x`), got ", in_index.device());
  TORCH_CHECK_VALUE((!ln_weight.has_value() && !ln_bias.has_value()) || normalize, "fasttrack.", op,
                    ": `ln_weight`/`ln_bias` are given but normalize=False");
  const int64_t d_in = x.size(-1);
  check_vector(op, ln_weight, "ln_weight", d_in, x);
  check_vector(op, ln_bias, "ln_bias", d_in, x);
  for (const auto* t : {ln_weight ? &*ln_weight : nullptr, ln_bias ? &*ln_bias : nullptr}) {
    TORCH_CHECK_TYPE(t == nullptr || t->scalar_type() == x.scalar_type(), "fasttrack.", op, ": `",
                     t == (ln_weight ? &*ln_weight : nullptr) ? "ln_weight" : "ln_bias", "` must have x's dtype (",
                     x.scalar_type(), "), got ", t ? t->scalar_type() : x.scalar_type());
  }
}

void check_index_values(const char* op, const int64_t* idx, int64_t k, int64_t d_in) {
  std::vector<int64_t> first(d_in, -1);
  for (const auto j : c10::irange(k)) {
    const int64_t c = idx[j];
    TORCH_CHECK_VALUE(c >= 0 && c < d_in, "fasttrack.", op, ": `in_index`[", j, "] = ", c, " is out of range [0, ",
                      d_in, ")");
    TORCH_CHECK_VALUE(first[c] < 0, "fasttrack.", op, ": `in_index`[", j, "] = ", c, " repeats `in_index`[", first[c],
                      "]; kept dims must be distinct");
    first[c] = j;
  }
}

void check_weight_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& in_index) {
  check_floating(weight, kOp, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "fasttrack.", kOp, ": `weight` must have 2 dims, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(in_index.dim() == 1 && weight.size(1) == in_index.size(0), "fasttrack.", kOp,
                    ": `weight.shape[1]` (", weight.size(1), ") must equal len(in_index) (",
                    in_index.dim() == 1 ? in_index.size(0) : -1, ")");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "fasttrack.", kOp, ": `weight` must have x's dtype (",
                   x.scalar_type(), "), got ", weight.scalar_type());
  if (bias.has_value()) {
    check_vector(kOp, bias, "bias", weight.size(0), x);
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "fasttrack.", kOp, ": `bias` must have x's dtype (",
                     x.scalar_type(), "), got ", bias->scalar_type());
  }
}

}  // namespace pruned_linear
}  // namespace fasttrack
