// fasttrack::merge_tokens / fasttrack::cosine_argmax: argument checks (csrc/merge_tokens.cpp) used by
// the CPU kernels (csrc/cpu/merge_tokens_kernel.cpp). The Python wrapper checks the metadata first
// (fasttrack/ops/merge_tokens.py::check_args); these guard the kernels' raw pointer loops when an op
// is called directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fasttrack {
namespace merge_tokens {

void check_merge_tokens_args(const at::Tensor& z, const std::optional<at::Tensor>& score,
                             const std::optional<at::Tensor>& proj, const std::optional<at::Tensor>& metric,
                             double keep_ratio, c10::string_view reduce);
void check_cosine_argmax_args(const at::Tensor& src, const at::Tensor& dst);

}  // namespace merge_tokens
}  // namespace fasttrack
