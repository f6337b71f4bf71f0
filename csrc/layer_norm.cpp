// fasttrack::_layer_norm: schema (kept identical to fasttrack/ops/layer_norm.py; tests/test_registry.py
// compares them) and argument checks (fasttrack/layer_norm.h). CPU kernel:
// csrc/cpu/layer_norm_kernel.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <fasttrack/checks.h>
#include <fasttrack/layer_norm.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("_layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
}

namespace fasttrack {
namespace layer_norm {

namespace {
void check_affine(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name) {
  constexpr const char* op = "_layer_norm";
  if (!t.has_value() || !t->defined()) return;
  check_floating(*t, op, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(-1), "fasttrack.", op, ": `", name, "` must have shape [",
                    x.size(-1), "], got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "fasttrack.", op, ": `", name, "` must be on ", x.device(), ", got ",
                    t->device());
}
}  // namespace

void check_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "_layer_norm";
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "fasttrack.", op, ": `x` must have at least 1 dim, got a scalar");
  check_affine(x, weight, "weight");
  check_affine(x, bias, "bias");
}

}  // namespace layer_norm
}  // namespace fasttrack
