"""The cache of CPU outputs (csrc/include/fasttrack/output_cache.h): outputs of >= 256 KiB reuse freed
buffers (rounded to 64 KiB, or to 2 MiB huge pages from 2 MiB on), every kernel overwrites all of a
reused buffer, the cache is bounded and can be emptied or disabled."""
import os
import subprocess
import sys

import pytest
import torch

import fasttrack
from fasttrack import _extension, reference
from fasttrack.ops.pad_scatter import random_index

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="the cache lives in fasttrack._C")

C_BIG = 30000  # 300 tokens × 30000 channels × fp32 = 36 MB: the huge-page buffers
C_MID = 300    # 290-300 tokens × 300 channels × fp32 ≈ 350 KB: the 64 KiB-grain buffers


def _big_calls(C_BIG=C_BIG):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, C_BIG, generator=g)
    index = random_index(1, 300, 290, generator=g)
    kept = torch.randn(1, 290, C_BIG, generator=g)
    attn = torch.rand(1, 2, 300, 300, generator=g).softmax(-1)
    qi = torch.tensor([[3]])
    return {
        "pad_scatter": (lambda: fasttrack.pad_scatter(kept, index, 300),
                        lambda: reference.pad_scatter(kept, index, 300)),
        "gather_tokens": (lambda: fasttrack.gather_tokens(x, index),
                          lambda: reference.gather_tokens(x, index)),
        "topk_select": (lambda: fasttrack.topk_select(attn, x, qi, 0.99, start=10).tokens,
                        lambda: reference.topk_select(attn, x, qi, None, None, None, 10, 290, 0.99)[0]),
        "merge_tokens": (lambda: fasttrack.merge_tokens(x, 0.99, proj=x[0, 0]).merged,
                         lambda: reference.merge_tokens(x, None, x[0, 0], None, 0.99)[0]),
    }


@pytest.mark.parametrize("C", [C_MID, C_BIG], ids=["mid", "big"])
@pytest.mark.parametrize("name", ["pad_scatter", "gather_tokens", "topk_select", "merge_tokens"])
def test_large_output_reuses_a_freed_buffer_and_overwrites_all_of_it(name, C):
    native, ref = _big_calls(C)[name]
    fasttrack.empty_cache()
    first = native()
    nbytes = first.nbytes
    assert nbytes >= 256 << 10
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # what a reused buffer holds must never show
    del first
    assert fasttrack.cached_bytes() >= nbytes
    second = native()
    assert second.data_ptr() == ptr
    assert fasttrack.cached_bytes() == 0
    torch.testing.assert_close(second, ref(), rtol=1e-5, atol=1e-5)
    del second
    assert fasttrack.empty_cache() >= nbytes
    assert fasttrack.cached_bytes() == 0


def test_pruned_linear_gather_phase_output_is_cached():
    """`PrunedLinear`'s gather buffer ([M, d_kept], freed after each GEMM) comes back every call."""
    x, idx = torch.randn(320, 768), torch.arange(0, 768, 2)
    fasttrack.empty_cache()
    first = torch.ops.fasttrack._pruned_linear_gather(x, idx, None, None, 1e-5, False)
    ptr = first.data_ptr()
    del first
    second = torch.ops.fasttrack._pruned_linear_gather(x, idx, None, None, 1e-5, False)
    assert second.data_ptr() == ptr and torch.equal(second, x[:, ::2])
    fasttrack.empty_cache()


def test_small_outputs_are_plain_allocations():
    kept, index = torch.randn(1, 3, 8), torch.tensor([[4, 0, 2]])
    fasttrack.empty_cache()
    out = fasttrack.pad_scatter(kept, index, 5)
    del out
    assert fasttrack.cached_bytes() == 0


def test_cached_output_behaves_like_any_tensor():
    native, _ = _big_calls()["pad_scatter"]
    out = native()
    out.resize_(10)  # shrinking keeps the buffer, growing goes through the allocator again
    out.resize_(C_BIG * 400)
    out[-1] = 1.0
    assert out.shape == (C_BIG * 400,) and out[-1] == 1.0
    del out
    fasttrack.empty_cache()


def _run(env_value):
    code = ("import fasttrack, torch; from fasttrack.ops.pad_scatter import random_index;"
            "k = torch.randn(1, 290, 30000); i = random_index(1, 300, 290);"
            "o = fasttrack.pad_scatter(k, i, 300); del o; print(fasttrack.cached_bytes())")
    env = {**os.environ, "FASTTRACK_CPU_CACHE_MB": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_limit_zero_disables_the_cache_and_a_bad_limit_is_refused():
    off = _run("0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "0"
    bad = _run("lots")
    assert bad.returncode != 0 and "FASTTRACK_CPU_CACHE_MB must be a non-negative integer" in bad.stderr
