// Argument checks shared by the op families' check functions (csrc/<op>.cpp). Every message starts
// with the op's Python name and names the argument, as the Python wrappers' messages do.
#pragma once

#include <ATen/core/Tensor.h>

namespace fasttrack {

// The floating dtypes every fasttrack op accepts.
inline bool is_floating(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// op: the Python name without the package ("gather_tokens").
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_floating(t), "fasttrack.", op, ": `", name,
                   "` must have dtype in (float32, float16, bfloat16, float64), got ", t.scalar_type());
}

}  // namespace fasttrack
