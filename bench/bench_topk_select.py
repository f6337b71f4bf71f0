"""topk_select (OSTrack candidate elimination) vs the eager reference and torch.compile of it, at
OSTrack-256 (template centre row R=1, and all 64 template rows) and OSTrack-384 (R=1), B = 1 and 32,
fp32 and bf16; topk_select_qk at OSTrack-256. Inputs are `grid_attention` values, so every provider
must return exactly the reference's indices (bench_op checks them on the benchmarked inputs).

Bytes the op must move: the R query rows × L candidate columns of attn per head (or q's R rows and
all of k), x's N - L + k surviving rows read once, the tokens written once, the four index outputs."""
import pytest
import torch

from bench.harness import PROVIDERS, bench_op
import fasttrack
from fasttrack import reference
from fasttrack.ops.topk_select import SHAPES, make_inputs
from fasttrack.reference import keep_count

CASES = [("ostrack256", False), ("ostrack256", True), ("ostrack384", False)]


def _native(attn, x, qi, w, bonus, gi, start, L, ratio):
    return fasttrack.topk_select(attn, x, qi, ratio, start=start, length=L, query_weight=w, bonus=bonus,
                                 global_index=gi)


def _native_qk(q, k, x, qi, w, bonus, gi, start, L, ratio, scale):
    return fasttrack.topk_select_qk(q, k, x, qi, ratio, start=start, length=L, scale=scale, query_weight=w,
                                    bonus=bonus, global_index=gi)


def moved_bytes(s, B, R, dtype, qk):
    es = torch.tensor([], dtype=dtype).element_size()
    k = keep_count(s.keep_ratio, s.L)
    rows = B * (s.N - s.L + k) * s.C * es * 2                 # surviving tokens read + written
    index = B * (R + 2 * s.L + s.L) * 8                        # query_index, 4 outputs, global_index
    scores = B * s.H * (R * s.D + s.N * s.D) * es if qk else B * s.H * R * s.L * es
    return rows + index + scores


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("name,all_rows", CASES, ids=["ostrack256-R1", "ostrack256-R64", "ostrack384-R1"])
def test_topk_select(benchmark, provider, name, all_rows, B, dtype):
    args = make_inputs(name, B, dtype, all_rows=all_rows, generator=torch.Generator().manual_seed(0))
    s, R = SHAPES[name], args[2].shape[1]
    bench_op(benchmark, provider, ref=reference.topk_select, native=_native, args=args,
             group=f"topk_select/{name}-R{R}-B{B}/{str(dtype)[6:]}", nbytes=moved_bytes(s, B, R, dtype, False),
             flops=2 * B * s.H * R * s.L, atol=0, rtol=0)


def _same_selection_mostly(actual, expected, atol, rtol):
    """q·kᵀ and softmax round differently per provider: near-equal scores may swap."""
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
    agree = torch.stack([torch.isin(a, e) for a, e in zip(actual[1], expected[1])]).float().mean().item()
    assert agree > 0.95, f"kept sets agree on only {agree:.1%}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B", [1, 32])
def test_topk_select_qk(benchmark, provider, B):
    args = make_inputs("ostrack256", B, torch.float32, qk=True, generator=torch.Generator().manual_seed(0))
    s = SHAPES["ostrack256"]
    bench_op(benchmark, provider, ref=reference.topk_select_qk, native=_native_qk, args=args,
             group=f"topk_select_qk/ostrack256-R1-B{B}/float32", nbytes=moved_bytes(s, B, 1, torch.float32, True),
             flops=2 * B * s.H * s.N * s.D, compare=_same_selection_mostly)
