"""Parity tolerances per dtype, shared by every test: (atol, rtol) for `torch.testing.assert_close`.
fp32 kernels accumulate in a different order than the reference; fp16/bf16 outputs are rounded
once from fp32 accumulators, so their error is about one unit in the last place of the output."""
import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0):
    """`scale` widens the tolerance for long reductions (e.g. GEMMs with K in the thousands)."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale)
