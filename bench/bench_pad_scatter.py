"""pad_scatter / gather_tokens (fasttrack native C++ on CPU, through the public API) vs the eager
reference and torch.compile of it, on OSTrack-256 (L=256, k=89) and OSTrack-384 (L=576, k=199)
search maps, C=768, B = 1 and 32, fp32 and bf16, both layouts. Bytes moved: kept tokens read once,
the full map written once (scatter) / read-and-written kept rows (gather; from an NCHW map every line
holds a kept position, so the whole map is read), plus the index.
For layout "nchw" every provider returns the contiguous NCHW map the conv head consumes (the
official code's transposed view is copied by the conv that reads it; the op fuses that copy).
On CUDA the native provider runs with ``check_index=False`` (no host synchronisation: the setting
the fused trackers use; the CPU kernels check as they read, for free)."""
import pytest
import torch

import fasttrack
from bench.harness import bench_device, bench_op
from fasttrack import reference
from fasttrack.ops.pad_scatter import random_index

# (name, L, k, C, (H, W))
SHAPES = [("ostrack256", 256, 89, 768, (16, 16)), ("ostrack384", 576, 199, 768, (24, 24))]
PARAMS = [
    pytest.mark.parametrize("provider", ["reference", "compile", "native"]),
    pytest.mark.parametrize("layout", ["tokens", "nchw"]),
    pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"]),
    pytest.mark.parametrize("B", [1, 32]),
    pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES]),
]


def _native(op):
    check = bench_device().type == "cpu"
    return lambda *a: op(*a, check_index=check)


def _params(fn):
    for p in PARAMS:
        fn = p(fn)
    return fn


@_params
def test_pad_scatter(benchmark, provider, layout, dtype, B, shape):
    name, L, k, C, hw = shape
    kept = torch.randn(B, k, C).to(dtype)
    index = random_index(B, L, k)
    hw = list(hw) if layout == "nchw" else []
    bench_op(benchmark, provider, ref=reference.pad_scatter, native=_native(fasttrack.pad_scatter),
             args=(kept, index, L, layout, hw), group=f"pad_scatter/{name}-B{B}-{layout}/{str(dtype)[6:]}",
             nbytes=B * (k + L) * C * kept.element_size() + index.numel() * 8, atol=0, rtol=0)


@_params
def test_gather_tokens(benchmark, provider, layout, dtype, B, shape):
    name, L, k, C, hw = shape
    x = torch.randn(*((B, L, C) if layout == "tokens" else (B, C, *hw))).to(dtype)
    index = random_index(B, L, k)
    # nchw: the k positions are spread over every 64-byte line of each plane, so the whole map is read
    read = B * (L if layout == "nchw" else k) * C * x.element_size()
    bench_op(benchmark, provider, ref=reference.gather_tokens, native=_native(fasttrack.gather_tokens),
             args=(x, index, layout), group=f"gather_tokens/{name}-B{B}-{layout}/{str(dtype)[6:]}",
             nbytes=read + B * k * C * x.element_size() + index.numel() * 8, atol=0, rtol=0)
