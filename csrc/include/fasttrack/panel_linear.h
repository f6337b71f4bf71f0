// The inference GEMM of the fused ViT blocks on AVX-512 CPUs (csrc/cpu/panel_linear_kernel.cpp):
// y = x @ Wᵀ + b, optionally followed by the exact (erf) GELU or by "+ residual", with W packed once
// into 64-column panels that oneDNN's brgemm micro-kernel (ATen's at::native::cpublas::brgemm)
// reads directly. fasttrack drives the micro-kernel itself — blocking over panels, rows and K,
// threads, and the epilogue — so a call costs a few µs of host work instead of oneDNN's per-call
// primitive setup (~17 µs hot, ~100 µs cold, per ViT-B linear on one Zen 4 core).
//
// Packed layout ([N/64, K, 64] tensor of W's dtype): panel p holds W's output columns 64p..64p+63;
// fp32 as K rows of 64 columns, bf16 as K/2 rows of 64 column pairs (VNNI: W[n][2k], W[n][2k+1]
// adjacent), the layout vdpbf16ps reads.
//
// The dispatch rule (`serves`; fasttrack.nn.linear.panel_serves is its Python twin, and
// PackedWeight packs for this path exactly where it holds):
// - float32 or bfloat16, N a multiple of 64, and for bfloat16 an even K;
// - the CPU kernels' ISA is AVX-512 (fasttrack/cpu_isa.h: ATEN_CPU_CAPABILITY caps it), and for
//   bfloat16 AVX512_BF16 (the epilogue rounds with vcvtneps2bf16);
// - oneDNN's brgemm micro-kernel runs bfloat16 here (probed once, while oneDNN is enabled: it is
//   compiled into x86 builds of torch and needs AVX-512 under ONEDNN_MAX_CPU_ISA; fp32 is served only
//   where bf16's probe passes) and oneDNN is enabled (torch.backends.mkldnn.enabled, read per call);
// - not an AMX CPU: there the micro-kernel wants oneDNN's own packing of W; oneDNN's packed
//   primitive (torch.ops.mkldnn._linear_pointwise) serves those CPUs instead.
// fp32 is computed in fp32 whatever torch.backends.mkldnn's fp32 matmul precision says (oneDNN's
// primitive may take TF32 / bf16 there when asked to).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fasttrack {
namespace panel_linear {

constexpr int64_t kPanel = 64;  // output columns per panel

enum class Epilogue { none, gelu, add };

// The whole rule for a weight of out_features x in_features.
bool serves(at::ScalarType dtype, int64_t in_features, int64_t out_features);

// W [N, K] (any strides) -> the packed layout above. Raises where `serves` does not hold.
at::Tensor pack(const at::Tensor& weight);

// x [..., K] (contiguous) @ W + bias [N] (any strides) -> [..., N] in x's dtype; Epilogue::add adds `residual`
// ([..., N], contiguous, x's dtype) in fp32 before the one rounding. Raises with the argument's name
// on any other input.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  Epilogue epilogue, const std::optional<at::Tensor>& residual);

}  // namespace panel_linear
}  // namespace fasttrack
