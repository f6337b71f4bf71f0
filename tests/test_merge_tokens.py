"""merge_tokens / cosine_argmax / bipartite_merge: parity with `fasttrack.reference` on the C++ CPU
kernel and the Triton kernel (interpreter), tie rules, determinism, autograd, opcheck, compile,
and bad inputs. bipartite_merge is also checked against a restatement of ToMe written here."""
import math

import pytest
import torch

import fasttrack
from fasttrack import reference as R
from fasttrack.ops.merge_tokens import MERGE_TOKENS
from tests import helpers
from tests.tolerances import assert_close

KERNELS = helpers.kernels()
HALF = (torch.float16, torch.bfloat16)


def run(kernel, z, keep_ratio, **kw):
    return helpers.call(kernel, fasttrack.merge_tokens, z, keep_ratio, **kw)


def make(B, N, C, dtype, *, use_proj, with_metric=False, seed=0):
    """Tie-free inputs. With `proj`, z and proj are small integers so ``z @ proj`` is exact in any
    summation order (score ties are then resolved by the index rule in every kernel alike); with
    `score`, a random permutation of distinct values."""
    g = torch.Generator().manual_seed(seed)
    if use_proj:
        z = torch.randint(-4, 5, (B, N, C), generator=g).to(dtype)
        proj, score = torch.randint(-4, 5, (C,), generator=g).to(dtype), None
    else:
        z = torch.randn(B, N, C, generator=g).to(dtype)
        proj = None
        score = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(dtype)
    metric = torch.randn(B, N, max(C // 3, 16), generator=g).to(dtype) if with_metric else None
    return z, score, proj, metric


def check_parity(kernel, z, score, proj, metric, r, reduce, backward=True):
    zk = z.clone().requires_grad_(backward)
    zr = z.clone().requires_grad_(backward)
    out = run(kernel, zk, r, score=score, proj=proj, metric=metric, reduce=reduce)
    ref = R.merge_tokens(zr, score, proj, metric, r, reduce)
    B, N, C = z.shape
    K = R.merge_count(r, N)
    assert out.merged.shape == (B, K, C) and out.merged.dtype == z.dtype
    for name, a, e in zip(("target_index", "source_index", "assignment"), out[1:], ref[1:]):
        assert torch.equal(a, e), f"{name} differs from the reference"
    assert_close(out.merged, ref[0])
    if backward:
        g = torch.randn(out.merged.shape, generator=torch.Generator().manual_seed(1)).to(z.dtype)
        (ga,) = torch.autograd.grad(out.merged, zk, g)
        (ge,) = torch.autograd.grad(ref[0], zr, g)
        assert_close(ga, ge)


# (T, L, C, r, B, dtype, reduce, use_proj): a sample of T∈{1,5,6} × L∈{64,144} × C∈{768,512} ×
# r∈{0.9,0.7,0.5} × B∈{1,32} × dtype × reduce that covers every value of every axis.
NATIVE_CASES = [
    (5, 64, 768, 0.9, 1, torch.float32, "sum", True),        # the ETCTrack / benchmark shape
    (1, 64, 768, 0.7, 32, torch.float32, "mean", False),
    (5, 144, 768, 0.5, 32, torch.float32, "mean", True),
    (6, 64, 512, 0.7, 32, torch.float16, "sum", False),
    (5, 144, 512, 0.9, 1, torch.bfloat16, "mean", True),
    (1, 144, 768, 0.5, 32, torch.bfloat16, "sum", False),
    (6, 144, 768, 0.9, 1, torch.float16, "mean", True),
    (5, 64, 512, 0.5, 1, torch.float32, "sum", False),
]


@pytest.mark.parametrize("kernel", helpers.kernels(triton=False))
@pytest.mark.parametrize("T,L,C,r,B,dtype,reduce,use_proj", NATIVE_CASES,
                         ids=lambda p: str(p).replace("torch.", ""))
def test_parity_tracker_shapes(kernel, T, L, C, r, B, dtype, reduce, use_proj):
    """The C++ kernel, and the compiled Triton kernel on a CUDA device."""
    z, score, proj, metric = make(B, T * L, C, dtype, use_proj=use_proj)
    check_parity(kernel, z, score, proj, metric, r, reduce)


# The interpreter runs each program in Python: tracker channel counts with few tokens, or the
# full T=5, L=64 template set once.
TRITON_CASES = [
    (1, 64, 768, 0.9, 1, torch.float32, "sum", True),
    (1, 64, 512, 0.5, 1, torch.bfloat16, "mean", False),
    (1, 64, 768, 0.7, 1, torch.float16, "mean", True),
    (5, 64, 768, 0.9, 1, torch.float32, "mean", False),
]


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton interpreter runs only without a CUDA device")
@pytest.mark.parametrize("T,L,C,r,B,dtype,reduce,use_proj", TRITON_CASES,
                         ids=lambda p: str(p).replace("torch.", ""))
def test_triton_parity_tracker_shapes(T, L, C, r, B, dtype, reduce, use_proj):
    z, score, proj, metric = make(B, T * L, C, dtype, use_proj=use_proj)
    check_parity("triton", z, score, proj, metric, r, reduce)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("use_proj,with_metric", [(True, False), (False, True)])
def test_parity_odd_shape(kernel, dtype, reduce, use_proj, with_metric):
    """N=37, C=50: no tile or vector width divides them."""
    z, score, proj, metric = make(3, 37, 50, dtype, use_proj=use_proj, with_metric=with_metric, seed=2)
    check_parity(kernel, z, score, proj, metric, 0.7, reduce)


@pytest.mark.parametrize("kernel", KERNELS)
def test_keep_all_returns_sorted_copy(kernel):
    z, score, _, _ = make(2, 37, 50, torch.float32, use_proj=False)
    out = run(kernel, z, 1.0, score=score)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    assert torch.equal(out.target_index, order)
    assert out.source_index.shape == (2, 0) and out.assignment.shape == (2, 0)
    assert torch.equal(out.merged, z.gather(1, order.unsqueeze(-1).expand(-1, -1, 50)))
    assert out.merged.data_ptr() != z.data_ptr()


@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_ties(kernel):
    """Score ties go to the lower index; similarity ties to the earlier target; a zero source has
    similarity 0 with every target, so it joins target slot 0."""
    z = torch.zeros(1, 6, 4)
    z[0, 1] = torch.tensor([1.0, 0, 0, 0])
    z[0, 2] = z[0, 4] = torch.tensor([0, 1.0, 0, 0])   # slots 1 and 2 identical
    z[0, 0] = torch.tensor([0, 3.0, 0, 0])              # ties slots 1 and 2 -> slot 1
    z[0, 3] = torch.tensor([1.0, 1.0, 0, 0])            # ties all three -> slot 0
    # z[0, 5] stays zero                                 # similarity 0 everywhere -> slot 0
    score = torch.tensor([[1.0, 2, 2, 0, 2, 1]])        # order 1, 2, 4 | 0, 5 | 3
    out = run(kernel, z, 0.5, score=score, reduce="sum")
    assert out.target_index.tolist() == [[1, 2, 4]]
    assert out.source_index.tolist() == [[0, 5, 3]]
    assert out.assignment.tolist() == [[1, 0, 0]]
    expect = torch.stack([z[0, 1] + z[0, 5] + z[0, 3], z[0, 2] + z[0, 0], z[0, 4]])[None]
    assert torch.equal(out.merged, expect)
    assert all(torch.equal(a, e) for a, e in zip(out[1:], R.merge_tokens(z, score, None, None, 0.5)[1:]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_deterministic_bits(kernel):
    B, N, C = (1, 96, 128) if kernel == "triton" else (4, 320, 768)
    z, score, _, _ = make(B, N, C, torch.float32, use_proj=False)
    z = z.float() * 10
    first = run(kernel, z, 0.5, score=score, reduce="mean")
    for _ in range(2):
        again = run(kernel, z, 0.5, score=score, reduce="mean")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradcheck_float64(reduce):
    z, score, _, metric = make(2, 11, 5, torch.float64, use_proj=False, with_metric=True)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fasttrack.merge_tokens(t, 0.6, score=score, metric=metric, reduce=reduce).merged, (z,))


def test_opcheck():
    cases = MERGE_TOKENS.cases("cpu", torch.float32)
    for case in (cases[0], cases[-1]):   # the ETCTrack shape, and score + metric at N=37, C=50
        z, *rest = case.args
        torch.library.opcheck(torch.ops.fasttrack.merge_tokens.default, (z.requires_grad_(True), *rest))
    a, b = torch.randn(2, 9, 12), torch.randn(2, 7, 12)
    torch.library.opcheck(torch.ops.fasttrack.cosine_argmax.default, (a, b))


def test_compile_fullgraph():
    z, _, proj, _ = make(2, 64, 48, torch.float32, use_proj=True)

    def f(t):
        out = fasttrack.merge_tokens(t, 0.7, proj=proj, reduce="mean")
        return out.merged * 2, out.assignment

    zc, ze = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got, want = torch.compile(f, fullgraph=True)(zc), f(ze)
    assert torch.equal(got[1], want[1])
    assert_close(got[0], want[0])
    got[0].sum().backward()
    want[0].sum().backward()
    assert_close(zc.grad, ze.grad)
    x = torch.randn(2, 20, 8)
    assert_close(torch.compile(fasttrack.bipartite_merge, fullgraph=True)(x, 5)[0], fasttrack.bipartite_merge(x, 5)[0])


# ---------------------------------------------------------------------------------------------
# cosine_argmax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_argmax_parity(kernel, dtype):
    g = torch.Generator().manual_seed(3)
    src, dst = torch.randn(2, 45, 70, generator=g).to(dtype), torch.randn(2, 83, 70, generator=g).to(dtype)
    src[0, 4] = 0                       # zero source: similarity 0 with all -> index 0
    dst[1, 0] = 0
    dst[1, 9] = dst[1, 5]               # exact duplicate: ties -> 5
    src[1, 7] = dst[1, 5] * 2
    best, arg = helpers.call(kernel, fasttrack.cosine_argmax, src, dst)
    eb, ea = R.cosine_argmax(src, dst)
    assert torch.equal(arg, ea) and arg[0, 4] == 0 and arg[1, 7] == 5
    assert best.dtype == torch.float32
    assert_close(best, eb, torch.float32)


# ---------------------------------------------------------------------------------------------
# bipartite_merge vs ToMe
# ---------------------------------------------------------------------------------------------
def tome_bipartite(x, r, class_token=False, size=None):
    """facebookresearch/ToMe `tome/merge.py`: `bipartite_soft_matching` (metric = x) followed by
    `merge_wavg`, restated in plain PyTorch (no fasttrack code)."""
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    size = torch.ones_like(x[..., 0, None]) if size is None else size
    xs = merge(x * size)
    size = merge(size)
    return xs / size, size


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("B,N,C,r,protected", [(2, 65, 768, 16, 1), (3, 37, 50, 18, 0), (1, 320, 512, 100, 1)])
def test_bipartite_matches_tome(kernel, B, N, C, r, protected):
    if kernel == "triton" and N > 100:
        pytest.skip("interpreter: the smaller shapes cover the Triton kernel")
    x = torch.randn(B, N, C, dtype=torch.float64)
    xk, xt = x.float().requires_grad_(True), x.float().requires_grad_(True)

    def two_rounds(x):   # the second round carries the sizes, as ToMe's layers do
        got, size = fasttrack.bipartite_merge(x, r, protected=protected)
        return (got, size) + fasttrack.bipartite_merge(got, r // 2, size=size, protected=protected)

    got, size, got2, size2 = helpers.call(kernel, two_rounds, xk)
    want, wsize = tome_bipartite(xt, r, class_token=protected == 1)
    want2, wsize2 = tome_bipartite(want, r // 2, class_token=protected == 1, size=wsize)
    assert got.shape == (B, N - r, C)
    assert torch.equal(size, wsize) and torch.equal(size2, wsize2)
    assert_close(got, want)
    assert_close(got2, want2)
    g = torch.randn_like(got2)
    (ga,) = torch.autograd.grad(got2, xk, g)
    (ge,) = torch.autograd.grad(want2, xt, g)
    assert_close(ga, ge)
    if protected == 0:  # reference.bipartite_merge lacks ToMe's class-token re-sort (see README)
        ref, rsize = R.bipartite_merge(x.float(), r, protected=protected)
        assert_close(got, ref)
        assert torch.equal(size, rsize)


def test_bipartite_protected_tokens_never_merge():
    x = torch.randn(2, 40, 16)
    x[:, 0] = x[:, 2]          # token 0 (protected A) is the best match of a B token pattern
    x[:, 1] = x[:, 3]          # token 1 (protected B) duplicates token 3, an ideal destination
    out, size = fasttrack.bipartite_merge(x, 19, protected=2)
    # protected A stays unmerged (size 1) and protected B receives nothing (size 1, first B slot)
    assert (size[:, : 20 - 19] == 1).all()
    assert torch.equal(out[:, 0], x[:, 0]) and (size[:, 1] == 1).all() and torch.equal(out[:, 1], x[:, 1])
    assert size.sum().item() == 2 * 40


def test_bipartite_gradcheck_float64():
    x = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 12, 1, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: fasttrack.bipartite_merge(t, 4, size=size, protected=1)[0], (x,))


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0.0, -0.5, 1.5])
def test_bad_keep_ratio(r):
    z = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="keep_ratio"):
        fasttrack.merge_tokens(z, r, proj=torch.randn(4))


def test_bad_shapes_and_arguments():
    z = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="`proj` must have shape \\[4\\]"):
        fasttrack.merge_tokens(z, 0.5, proj=torch.randn(5))
    with pytest.raises(ValueError, match="`metric` must have shape \\[2, 8, \\*\\]"):
        fasttrack.merge_tokens(z, 0.5, proj=torch.randn(4), metric=torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match="exactly one of `score`"):
        fasttrack.merge_tokens(z, 0.5, proj=torch.randn(4), score=torch.randn(2, 8))
    with pytest.raises(ValueError, match="`score` must have shape"):
        fasttrack.merge_tokens(z, 0.5, score=torch.randn(2, 7))
    with pytest.raises(ValueError, match="`reduce`"):
        fasttrack.merge_tokens(z, 0.5, proj=torch.randn(4), reduce="max")
    with pytest.raises(ValueError, match="`dst`"):
        fasttrack.cosine_argmax(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_scores_name_the_argument(kernel):
    z = torch.randn(1, 16, 8)
    score = torch.randn(1, 16)
    score[0, 3] = math.nan
    with pytest.raises(ValueError, match="`score` contains NaN"):
        run(kernel, z, 0.5, score=score)
    proj = torch.randn(8)
    proj[2] = math.nan
    with pytest.raises(ValueError, match="`z @ proj`.*`proj`"):
        run(kernel, z, 0.5, proj=proj)


def test_bipartite_bad_r():
    """ToMe clamps r to the mergeable count; clamp=False refuses instead."""
    x = torch.randn(2, 11, 4)
    with pytest.raises(ValueError, match="`r` must be an int in \\[0, .* = 5\\]"):
        fasttrack.bipartite_merge(x, 6, clamp=False)
    with pytest.raises(ValueError, match="`r` must be an int in \\[0, .* = 4\\]"):
        fasttrack.bipartite_merge(x, 5, protected=2, clamp=False)
    with pytest.raises(TypeError, match="`r` must be an int"):
        fasttrack.bipartite_merge(x, 2.5)
    with pytest.raises(ValueError, match="`metric`"):
        fasttrack.bipartite_merge(x, 2, metric=torch.randn(2, 10, 4))


def test_batch_rows_in_parallel_under_inference_mode():
    """B >= threads runs whole batch rows per thread, with the score gemv split over the threads; under
    torch.inference_mode the outputs are inference tensors the worker threads must not write via ATen."""
    g = torch.Generator().manual_seed(3)
    z, proj = torch.randn(6, 320, 96, generator=g), torch.randn(96, generator=g)
    expected = R.merge_tokens(z, None, proj, None, 0.7)
    with torch.inference_mode():
        got = fasttrack.merge_tokens(z, 0.7, proj=proj)
    assert torch.equal(got.target_index, expected[1]) and torch.equal(got.assignment, expected[3])
    torch.testing.assert_close(got.merged, expected[0])
