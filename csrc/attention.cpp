// fasttrack::_attention: schema (kept identical to fasttrack/ops/attention.py; tests/test_registry.py
// compares them) and argument checks (fasttrack/attention.h). CPU kernel:
// csrc/cpu/attention_kernel.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include <fasttrack/attention.h>
#include <fasttrack/checks.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) { m.def("_attention(Tensor qkv, int num_heads, float scale) -> Tensor"); }

namespace fasttrack {
namespace attention {

void check_args(const at::Tensor& qkv, int64_t num_heads) {
  constexpr const char* op = "_attention";
  check_floating(qkv, op, "qkv");
  TORCH_CHECK_VALUE(qkv.dim() == 3, "fasttrack.", op, ": `qkv` must have 3 dims, got shape ", qkv.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, "fasttrack.", op, ": `num_heads` must be an int >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(qkv.size(2) % 3 == 0 && qkv.size(2) / 3 % num_heads == 0, "fasttrack.", op, ": `qkv.shape[-1]` (",
                    qkv.size(2), ") must be 3 * num_heads * head_dim with num_heads=", num_heads);
}

}  // namespace attention
}  // namespace fasttrack
