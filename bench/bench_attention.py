"""The CPU attention core `attention_core` (internal op ``_attention``) vs its eager spec
(`reference`) and torch.compile of it, at the OSTrack-256 / -384 block shapes (12 heads of 64), B = 1
and 8. `python -m bench attention` times it against the cores it replaces in the fused modules."""
import pytest
import torch

from bench.harness import bench_device, bench_op
from fasttrack import reference
from fasttrack.ops import attention_core

pytestmark = pytest.mark.skipif(bench_device().type != "cpu", reason="the attention kernel is a CPU kernel")


@pytest.mark.parametrize("provider", ["reference", "compile", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("N", [320, 720])
def test_attention(benchmark, provider, N, B, dtype):
    H, C = 12, 768
    qkv = torch.randn(B, N, 3 * C).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    bench_op(benchmark, provider, ref=reference.attention, native=attention_core, args=(qkv, H, (C // H) ** -0.5),
             group=f"attention/B{B}-N{N}/{str(dtype)[6:]}", nbytes=B * N * 4 * C * qkv.element_size(),
             flops=4 * B * H * N * N * (C // H), atol=tol, rtol=tol)
