// fasttrack::pruned_linear / fasttrack::_pruned_linear_gather: argument checks (csrc/pruned_linear.cpp)
// used by the CPU kernel (csrc/cpu/pruned_linear_kernel.cpp). The Python wrapper runs the same checks
// first; these guard direct torch.ops calls, since the kernel reads through in_index.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fasttrack {
namespace pruned_linear {

// Metadata of the gather phase (both ops; op: the name the messages give).
void check_gather_args(const char* op, const at::Tensor& x, const at::Tensor& in_index,
                       const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                       bool normalize);
// Range and distinctness of every kept index (idx: in_index's k values, on the CPU), before any read
// through it.
void check_index_values(const char* op, const int64_t* idx, int64_t k, int64_t d_in);
// weight / bias of pruned_linear against x and in_index.
void check_weight_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& in_index);

}  // namespace pruned_linear
}  // namespace fasttrack
