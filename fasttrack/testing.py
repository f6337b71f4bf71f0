"""Parity tolerances per dtype, used by the test-suite, `python -m fasttrack.check` and the
benchmarks: (atol, rtol). Kernels accumulate in fp32 in a different order than the reference;
fp16/bf16 outputs are rounded once from fp32 accumulators, so their error is about one unit in the
last place of the output."""
from __future__ import annotations

import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    atol, rtol = TOL[dtype]
    return atol * scale, rtol * scale


def assert_close(actual, expected, dtype=None, scale=1.0):
    """`scale` widens the tolerance for long reductions (e.g. GEMMs with K in the thousands)."""
    atol, rtol = tolerance(dtype or expected.dtype, scale)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
