// fasttrack::_attention: argument checks (csrc/attention.cpp) used by the CPU kernel
// (csrc/cpu/attention_kernel.cpp). The Python wrapper runs the same checks first; these guard direct
// torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fasttrack {
namespace attention {

// qkv [B, N, 3·C] floating, num_heads >= 1 dividing C.
void check_args(const at::Tensor& qkv, int64_t num_heads);

// Whether the vectorised kernel serves this dtype and head dim on this CPU (the others run the
// composite path: the spec's matmul + softmax in C++). fasttrack.nn's dispatch rule asks it.
bool fast_path_serves(at::ScalarType dtype, int64_t head_dim);

}  // namespace attention
}  // namespace fasttrack
