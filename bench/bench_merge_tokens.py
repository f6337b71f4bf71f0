"""merge_tokens (ETCTrack token compressor, fixed random projection) and bipartite_merge (ToMe):
fasttrack's kernel vs the eager reference and torch.compile of it, at T=5 template frames of
L=64 (128 px) or L=144 (192 px) tokens, C=768 (ViT-B), r ∈ {0.9, 0.5}, B ∈ {1, 32}, fp32."""
import pytest
import torch

import fasttrack
from bench.harness import bench_op
from fasttrack import reference as R

T, C = 5, 768


def _native(z, score, proj, metric, keep_ratio, reduce):
    return tuple(fasttrack.merge_tokens(z, keep_ratio, score=score, proj=proj, metric=metric, reduce=reduce))


@pytest.mark.parametrize("provider", ["reference", "compile", "native", "triton"])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("r", [0.9, 0.5])
@pytest.mark.parametrize("L", [64, 144])
def test_merge_tokens(benchmark, provider, L, r, B):
    N = T * L
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, N, C, generator=g)
    proj = torch.randn(C, generator=g)
    K = R.merge_count(r, N)
    # read z twice (score, similarity) + gathered rows once, write K rows; FLOPs: score + S×K similarity
    bench_op(benchmark, provider, ref=R.merge_tokens, native=_native, args=(z, None, proj, None, r, "sum"),
             group=f"merge_tokens/T{T}L{L}-r{r}-B{B}/fp32", nbytes=(3 * B * N * C + B * K * C) * 4,
             flops=2 * B * N * C + 2 * B * (N - K) * K * C)


@pytest.mark.parametrize("provider", ["reference", "compile", "native"])
@pytest.mark.parametrize("B", [1, 32])
def test_bipartite_merge(benchmark, provider, B):
    """ToMe inside a ViT-B layer: OSTrack-256's 320 tokens, r = 16 per layer."""
    x = torch.randn(B, 320, C, generator=torch.Generator().manual_seed(0))
    bench_op(benchmark, provider, ref=R.bipartite_merge, native=fasttrack.bipartite_merge, args=(x, 16),
             group=f"bipartite_merge/N320-r16-B{B}/fp32", nbytes=3 * B * 320 * C * 4,
             flops=2 * B * 160 * 160 * C)
