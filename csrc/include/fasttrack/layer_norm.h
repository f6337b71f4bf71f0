// fasttrack::_layer_norm: argument checks (csrc/layer_norm.cpp), the CPU kernel
// (csrc/cpu/layer_norm_kernel.cpp) and what its vectorised path serves. The Python wrapper runs the
// same checks first; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fasttrack {
namespace layer_norm {

// x floating with >= 1 dim; weight / bias None or floating [C] (C = x.size(-1)) on x's device.
void check_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias);

// Whether the vectorised kernel serves this dtype on this CPU (float32 with AVX-512, bfloat16 with
// AVX512_BF16); other inputs run at::layer_norm.
bool fast_path_serves(at::ScalarType dtype);

// The registered CPU kernel (also called by the native ViT block, csrc/cpu/vit_block.cpp).
at::Tensor layer_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps);

}  // namespace layer_norm
}  // namespace fasttrack
