"""`python -m bench attention [--rounds N] [--threads T]` — the attention-core dispatch rule, measured.

`fasttrack.nn.vit.attention_kernel_serves` sends the fused modules' CPU attention core to
fasttrack's `attention_core` kernel instead of the core `sdpa_is_faster` would pick (SDPA for fp32,
the explicit ``softmax(q·kᵀ)·v`` for bf16). This times, interleaved call by call in an order rotated
every round, on the same qkv: the kernel (from the qkv output, heads written side by side), SDPA and
the explicit core (each with the split before and the merge after that the modules do), and the eager
spec; medians over rounds, at the tracker shapes (OSTrack-256 / -384 blocks, the token counts left
after candidate elimination, ViT-S). A fused module takes the kernel only where it served the dtype;
the ratios say by how much.
"""
from __future__ import annotations

import statistics

import torch

from bench.interleaved import time_rounds, tool_args
from fasttrack import reference
from fasttrack.nn.vit import FusedAttention
from fasttrack.ops import attention_core
from fasttrack.ops.attention import fast_path_serves

# name, B, N, C, heads
SHAPES = [("ostrack256", 1, 320, 768, 12), ("ce-244", 1, 244, 768, 12), ("ce-153", 1, 153, 768, 12),
          ("ostrack384", 1, 720, 768, 12), ("ostrack256/B8", 8, 320, 768, 12), ("vit-s", 1, 320, 384, 6)]


def providers(qkv, H, scale):
    """The kernel, and the two cores of `FusedAttention` it replaces, each with the module's own split
    and merge around it, and the eager spec."""
    m = FusedAttention(qkv.shape[-1] // 3, H).eval()
    m.scale = scale
    return {"kernel": lambda: attention_core(qkv, H, scale),
            "sdpa": lambda: m._sdpa(*m._split(qkv), None),
            "explicit": lambda: m._fast_explicit(*m._split(qkv), None)[0],
            "reference": lambda: reference.attention(qkv, H, scale)}


def main(argv=None) -> int:
    a = tool_args("attention", __doc__, 15, "shape/dtype", argv)
    print("| shape | dtype | kernel path | kernel ms | SDPA ms | explicit ms | eager spec ms | "
          "replaced core / kernel | max abs err vs spec |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    slower = 0
    for name, B, N, C, H in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            if a.k not in f"{name}/{str(dtype)[6:]}":
                continue
            qkv = torch.randn(B, N, 3 * C).to(dtype)
            scale = (C // H) ** -0.5
            fns = providers(qkv, H, scale)
            with torch.no_grad():
                err = (fns["kernel"]().float() - fns["reference"]().float()).abs().max().item()
                times = time_rounds(fns, a.rounds)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            replaced = "sdpa" if dtype == torch.float32 else "explicit"
            path = "vectorised" if fast_path_serves(dtype, C // H) else "composite"
            print(f"| {name} | {str(dtype)[6:]} | {path} | {med['kernel']:.3f} | {med['sdpa']:.3f} | "
                  f"{med['explicit']:.3f} | {med['reference']:.3f} | {med[replaced] / med['kernel']:.2f} ({replaced}) "
                  f"| {err:.1e} |", flush=True)
            slower += med[replaced] < med["kernel"]
    print(f"\n{slower} case(s) where the kernel is slower than the core it replaces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
