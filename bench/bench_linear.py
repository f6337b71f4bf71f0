"""FastLinear (pre-packed weight: the panel GEMM or oneDNN, `fasttrack.nn.linear`) vs nn.Linear eager
(`reference`) and torch.compile of it, at the ViT-B linears of OSTrack-256 (M = 64 + 256 = 320 tokens
per image), B = 1 and 32."""
import pytest
import torch
import torch.nn.functional as F

from bench.harness import bench_device, bench_op
from fasttrack.nn.linear import FastLinear

# FastLinear's packed path is a CPU feature: on another device it is nn.Linear
pytestmark = pytest.mark.skipif(bench_device().type != "cpu", reason="FastLinear packs weights for CPUs only")

# (d_in, d_out): qkv, proj, fc1, fc2
LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


@pytest.mark.parametrize("provider", ["reference", "compile", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("d_in,d_out", LINEARS, ids=[f"{i}x{o}" for i, o in LINEARS])
def test_linear(benchmark, provider, B, d_in, d_out, dtype):
    m = FastLinear(d_in, d_out, dtype=dtype).requires_grad_(False)
    x = torch.randn(B, 320, d_in, dtype=dtype)

    def native(x, w, b):
        return m(x)

    M = B * 320
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    bench_op(benchmark, provider, ref=F.linear, native=native, args=(x, m.weight, m.bias),
             group=f"linear/B{B}-{d_in}x{d_out}/{str(dtype)[6:]}",
             nbytes=(M * d_in + d_in * d_out + M * d_out) * x.element_size(), flops=2 * M * d_in * d_out,
             atol=tol, rtol=tol)
