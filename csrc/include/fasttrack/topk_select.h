// fasttrack::topk_select / fasttrack::topk_select_qk: the checked call, shared by the argument checks
// (csrc/topk_select.cpp) and the CPU kernel (csrc/cpu/topk_select_kernel.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fasttrack {
namespace topk_select {

// A checked call: sizes, the kept count K, and the inputs the kernel reads through raw pointers.
struct Problem {
  const char* op;
  int64_t B, N, C, R, start, L, K;
  at::Tensor x, query_index, query_weight, bonus, global_index;  // contiguous; weight/bonus float32
};

// The checks of each op (the Python wrapper runs the same first; these guard direct torch.ops calls):
// metadata, ranges (start/length compared without overflow) and the query_index values.
Problem check_topk_select_args(const at::Tensor& attn, const at::Tensor& x, const at::Tensor& query_index,
                               const std::optional<at::Tensor>& query_weight, const std::optional<at::Tensor>& bonus,
                               const std::optional<at::Tensor>& global_index, int64_t start, int64_t length,
                               double keep_ratio);
Problem check_topk_select_qk_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x,
                                  const at::Tensor& query_index, const std::optional<at::Tensor>& query_weight,
                                  const std::optional<at::Tensor>& bonus, const std::optional<at::Tensor>& global_index,
                                  int64_t start, int64_t length, double keep_ratio);

}  // namespace topk_select
}  // namespace fasttrack
