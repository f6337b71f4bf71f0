// fasttrack::vit::attn_residual / mlp_residual (csrc/include/fasttrack/vit_block.h).
#include <fasttrack/vit_block.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <fasttrack/attention.h>
#include <fasttrack/layer_norm.h>
#include <fasttrack/panel_linear.h>

namespace fasttrack {
namespace attention {
at::Tensor attention_cpu(const at::Tensor& qkv, int64_t num_heads, double scale);
}  // namespace attention

namespace vit {

namespace {

using OptTensor = std::optional<at::Tensor>;
using Scalars = c10::List<std::optional<at::Scalar>>;

// The oneDNN ops are looked up on first use: a torch built without oneDNN still imports fasttrack
// (the Python side never calls these there: fasttrack.nn.linear.packable is false).
c10::OperatorHandle mkldnn_op(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findSchema({name, overload});
  TORCH_CHECK(op.has_value(), "fasttrack.vit: this torch build has no ", name, " (oneDNN)");
  return *op;
}

// A weight packed by fasttrack::panel_linear::pack (a strided [N/64, K, 64] tensor) runs that GEMM;
// one reordered by oneDNN (an opaque oneDNN tensor) runs oneDNN's primitive. The Python path
// (fasttrack.nn.linear.packed_linear*) dispatches on the same form, so both run the same kernel.
bool is_panel(const LinearArgs& l) {
  const at::Tensor& w = l.packed_weight;
  return w.layout() == at::kStrided && w.dim() == 3 && w.size(2) == panel_linear::kPanel;
}

at::Tensor panel(const at::Tensor& x, const LinearArgs& l, panel_linear::Epilogue epilogue,
                 const std::optional<at::Tensor>& residual) {
  return panel_linear::linear(x, l.packed_weight, l.bias, epilogue, residual);
}

// x @ Wᵀ + b, then the exact GELU where `gelu`
at::Tensor linear(const at::Tensor& x, const LinearArgs& l, bool gelu) {
  if (is_panel(l)) return panel(x, l, gelu ? panel_linear::Epilogue::gelu : panel_linear::Epilogue::none, {});
  static const auto op = mkldnn_op("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view,
                                               Scalars, std::optional<c10::string_view>)>();
  return op.call(x, l.packed_weight, l.bias, gelu ? "gelu" : "none", Scalars(), gelu ? "none" : "");
}

// other + x @ Wᵀ + b (oneDNN: sum post-op)
at::Tensor linear_add(const at::Tensor& x, const at::Tensor& other, const LinearArgs& l) {
  if (is_panel(l)) return panel(x, l, panel_linear::Epilogue::add, other);
  static const auto op = mkldnn_op("mkldnn::_linear_pointwise", "binary")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, c10::string_view)>();
  return op.call(x, other, l.packed_weight, l.bias, "add");
}

// The two fasttrack kernels are called directly (no dispatcher between them and the block): a
// profiler event under each op's name keeps them visible to `python -m bench profile`.
at::Tensor norm(const at::Tensor& x, const LayerNormArgs& n) {
  RECORD_FUNCTION("fasttrack::_layer_norm", std::vector<c10::IValue>());
  return fasttrack::layer_norm::layer_norm_cpu(x, n.weight, n.bias, n.eps);
}

at::Tensor attention_core(const at::Tensor& qkv, int64_t num_heads, double scale) {
  RECORD_FUNCTION("fasttrack::_attention", std::vector<c10::IValue>());
  return attention::attention_cpu(qkv, num_heads, scale);
}

void check_x(const at::Tensor& x, const char* fn) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "fasttrack.vit.", fn, ": `x` must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.is_contiguous(), "fasttrack.vit.", fn,
                    ": `x` must be a contiguous [B, N, C] tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "fasttrack.vit.", fn, ": `x` must be floating, got ",
                    x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attn_residual(const at::Tensor& x, const LayerNormArgs& norm1, const LinearArgs& qkv,
                                                 const LinearArgs& proj, int64_t num_heads, double scale) {
  check_x(x, "attn_residual");
  at::Tensor qkv_out = linear(norm(x, norm1), qkv, false);
  TORCH_CHECK_VALUE(qkv_out.dim() == 3 && qkv_out.size(2) == 3 * x.size(2), "fasttrack.vit.attn_residual: the qkv ",
                    "weight must map C=", x.size(2), " to 3*C, got an output of shape ", qkv_out.sizes());
  at::Tensor o = attention_core(qkv_out, num_heads, scale);
  return {linear_add(o, x, proj), qkv_out};
}

at::Tensor mlp_residual(const at::Tensor& x, const LayerNormArgs& norm2, const LinearArgs& fc1, const LinearArgs& fc2) {
  check_x(x, "mlp_residual");
  return linear_add(linear(norm(x, norm2), fc1, true), x, fc2);
}

at::Tensor block(const at::Tensor& x, const LayerNormArgs& norm1, const LinearArgs& qkv, const LinearArgs& proj,
                 int64_t num_heads, double scale, const LayerNormArgs& norm2, const LinearArgs& fc1,
                 const LinearArgs& fc2) {
  return mlp_residual(std::get<0>(attn_residual(x, norm1, qkv, proj, num_heads, scale)), norm2, fc1, fc2);
}

}  // namespace vit
}  // namespace fasttrack
