"""`python -m bench gemm [--rounds N] [--threads T]` — the packed-GEMM dispatch rule, measured.

`fasttrack.nn.linear.PackedWeight` packs a weight for fasttrack's panel GEMM where `panel_serves`
(csrc/include/fasttrack/panel_linear.h), and for oneDNN's primitive (`mkldnn._linear_pointwise`)
elsewhere. This times both on the same inputs, interleaved call by call in an order rotated every
round, each with the epilogue the fused blocks give it (qkv: none, proj / fc2: + residual, fc1:
exact GELU), at the ViT-B linears of OSTrack-256 (320 tokens per image) for B=1 and B=8, and the
eager ``F.linear`` (+ the same epilogue) as a third; medians over rounds. The panel GEMM runs only
where the rule holds; the ratios say by how much it is faster there.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from bench.interleaved import time_rounds, tool_args
from fasttrack.nn.linear import (PackedWeight, packed_linear, packed_linear_add, packed_linear_gelu,
                                 panel_serves)

# name, d_in, d_out, epilogue
LINEARS = [("qkv", 768, 2304, "none"), ("proj", 768, 768, "add"), ("fc1", 768, 3072, "gelu"),
           ("fc2", 3072, 768, "add")]


def providers(x, weight, bias, residual, epilogue):
    """The panel GEMM, oneDNN's primitive (both on their own packed weight) and eager, one epilogue."""
    panel = PackedWeight().get(weight)
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight)

    def packed(w):
        if epilogue == "gelu":
            return lambda: packed_linear_gelu(x, w, bias)
        if epilogue == "add":
            return lambda: packed_linear_add(x, residual, w, bias)
        return lambda: packed_linear(x, w, bias)

    def eager():
        y = F.linear(x, weight, bias)
        return F.gelu(y) if epilogue == "gelu" else residual + y if epilogue == "add" else y

    return {"panel": packed(panel), "onednn": packed(onednn), "eager": eager}


def main(argv=None) -> int:
    a = tool_args("gemm", __doc__, 20, "linear/B/dtype", argv)
    print("| linear | B | dtype | panel ms | oneDNN ms | eager ms | panel / oneDNN | (best of rounds) | "
          "max abs diff panel vs oneDNN |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    slower = skipped = 0
    for name, d_in, d_out, epilogue in LINEARS:
        for B in (1, 8):
            for dtype in (torch.float32, torch.bfloat16):
                case = f"{name}/B{B}/{str(dtype)[6:]}"
                if a.k not in case:
                    continue
                g = torch.Generator().manual_seed(0)
                weight = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to(dtype)
                bias = torch.randn(d_out, generator=g).to(dtype)
                x = torch.randn(B, 320, d_in, generator=g).to(dtype)
                residual = torch.randn(B, 320, d_out, generator=g).to(dtype)
                if not panel_serves(weight):
                    print(f"| {name} | {B} | {str(dtype)[6:]} | (not served here) | | | | | |", flush=True)
                    skipped += 1
                    continue
                fns = providers(x, weight, bias, residual, epilogue)
                with torch.no_grad():
                    diff = (fns["panel"]().float() - fns["onednn"]().float()).abs().max().item()
                    times = time_rounds(fns, a.rounds)
                med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
                best = min(times["panel"]) / min(times["onednn"])
                print(f"| {name} | {B} | {str(dtype)[6:]} | {med['panel']:.3f} | {med['onednn']:.3f} | "
                      f"{med['eager']:.3f} | {med['panel'] / med['onednn']:.3f} | {best:.3f} | {diff:.1e} |",
                      flush=True)
                slower += med["panel"] > med["onednn"]
    print(f"\n{slower} case(s) where the panel GEMM is slower than oneDNN; {skipped} not served on this CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
