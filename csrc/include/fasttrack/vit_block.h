// The fused ViT block's CPU inference path as one C++ call (csrc/cpu/vit_block.cpp): the same
// kernels the Python path of fasttrack.nn.vit.FusedBlock runs (fasttrack::_layer_norm,
// the packed GEMMs, fasttrack::_attention), in the same order, so the result is
// bit-identical; only the Python between them is gone (~0.4 ms of a 26 ms bf16 ViT-B block at 320
// tokens on one Zen 4 core). fasttrack.nn.vit.native_block_serves states when it is used.
//
// Weights are packed for fasttrack::panel_linear (fasttrack/panel_linear.h) where its rule serves
// them, else by oneDNN (torch.ops.mkldnn._reorder_linear_weight): fasttrack.nn.linear.PackedWeight
// picks, and each GEMM here runs the kernel its weight's form belongs to. Biases and LayerNorm
// parameters are optional, as in nn.LayerNorm / nn.Linear.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fasttrack {
namespace vit {

struct LayerNormArgs {
  std::optional<at::Tensor> weight, bias;
  double eps;
};

struct LinearArgs {
  at::Tensor packed_weight;
  std::optional<at::Tensor> bias;
};

// (x + proj(attention(qkv(norm1(x)))), qkv(norm1(x))): x [B, N, C] contiguous; the attention core is
// fasttrack::_attention's CPU kernel.
std::tuple<at::Tensor, at::Tensor> attn_residual(const at::Tensor& x, const LayerNormArgs& norm1, const LinearArgs& qkv,
                                                 const LinearArgs& proj, int64_t num_heads, double scale);

// x + fc2(gelu(fc1(norm2(x)))), exact (erf) GELU.
at::Tensor mlp_residual(const at::Tensor& x, const LayerNormArgs& norm2, const LinearArgs& fc1, const LinearArgs& fc2);

// mlp_residual(attn_residual(x)[0]): the whole block.
at::Tensor block(const at::Tensor& x, const LayerNormArgs& norm1, const LinearArgs& qkv, const LinearArgs& proj,
                 int64_t num_heads, double scale, const LayerNormArgs& norm2, const LinearArgs& fc1,
                 const LinearArgs& fc2);

}  // namespace vit
}  // namespace fasttrack
