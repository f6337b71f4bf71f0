"""topk_select / topk_select_qk (issue 3): the C++ CPU kernels (default backend) and the Triton kernels
(under the interpreter, `use_backend("triton")`) vs `fasttrack.reference`, at OSTrack-256/-384,
UTPTrack-S and odd shapes; ties, chained selections, k == L, autograd, opcheck, torch.compile and
bad input.

Two kinds of parity:
- exact: on `grid_attention` inputs every partial sum is exact, so a kernel that reduces as the spec
  does gets bit-identical float32 scores: all five outputs must equal the reference's, ties included;
- consistent (softmax attention, and q·kᵀ rows whose exp/sum order differs from torch's): the
  selection must be in descending order of the float64 scores up to `eps`, equal to the reference
  wherever neighbouring scores are further apart than that (the check asserts that holds for most
  positions, so it cannot pass vacuously), and tokens / global indices must follow it exactly.
"""
import math

import pytest
import torch

import fasttrack
from fasttrack import reference
from fasttrack.ops.topk_select import SHAPES, grid_attention, make_inputs
from tests import helpers

KERNELS = helpers.kernels()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
call = helpers.call


def run(args, qk=False):
    """Schema arguments -> the public wrapper's call."""
    if qk:
        q, k, x, qi, w, bonus, gi, start, L, ratio, scale = args
        return fasttrack.topk_select_qk(q, k, x, qi, ratio, start=start, length=L, scale=scale, query_weight=w,
                                        bonus=bonus, global_index=gi)
    attn, x, qi, w, bonus, gi, start, L, ratio = args
    return fasttrack.topk_select(attn, x, qi, ratio, start=start, length=L, query_weight=w, bonus=bonus,
                                 global_index=gi)


def reference_of(args, qk=False):
    return (reference.topk_select_qk if qk else reference.topk_select)(*args)


def assert_equal_outputs(out, expected):
    names = ("tokens", "keep_index", "removed_index", "keep_global", "removed_global")
    for name, a, e in zip(names, out, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype}{list(a.shape)} vs {e.dtype}{list(e.shape)}"
        assert torch.equal(a, e), f"{name} differs from the reference"


def scores64(args, qk=False):
    """The spec's score in float64 (ground truth for the consistency check)."""
    if qk:
        q, k, x, qi, w, bonus, gi, start, L, ratio, scale = args
        B, H, N, D = q.shape
        qr = q.double().gather(2, qi[:, None, :, None].expand(B, H, qi.shape[1], D))
        rows = torch.softmax(qr @ k.double().transpose(-1, -2) * scale, dim=-1)
    else:
        attn, x, qi, w, bonus, gi, start, L, ratio = args
        B, H, N, _ = attn.shape
        rows = attn.double().gather(2, qi[:, None, :, None].expand(B, H, qi.shape[1], N))
    cand = rows[..., start:start + L]
    if w is not None:
        cand = cand * w.double()[:, None, :, None]
    score = cand.mean(2).mean(1)
    return score, (score + bonus.double() if bonus is not None else score)


def assert_consistent_selection(out, args, qk=False, rel_eps=1e-5):
    expected = reference_of(args, qk)
    for a, e in zip(out, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
    x, gi, start, L = args[2 if qk else 1], args[6 if qk else 5], args[-4 if qk else -3], args[-3 if qk else -2]
    tokens, keep, removed, keep_g, removed_g = out
    attention, score = scores64(args, qk)
    # float32 rounding of the attention mean (in any order), plus that of adding the bonus
    eps = rel_eps * attention.abs().max().item() + 8 * torch.finfo(torch.float32).eps * score.abs().max().item()
    order = torch.cat([keep, removed], 1)
    ref_order = torch.cat([expected[1], expected[2]], 1)
    assert torch.equal(order.sort(1).values, torch.arange(L).expand_as(order)), "not a permutation of the candidates"
    s = score.gather(1, order)
    assert (s[:, 1:] <= s[:, :-1] + eps).all(), "not in descending score order"
    rs = score.gather(1, ref_order)
    apart = rs[:, :-1] - rs[:, 1:] > eps
    forced = torch.ones_like(ref_order, dtype=torch.bool)
    forced[:, 1:] &= apart
    forced[:, :-1] &= apart
    assert forced.float().mean() > 0.9, "test inputs are too tie-prone to check anything"
    assert torch.equal(order[forced], ref_order[forced])
    k = keep.shape[1]
    if 0 < k < L:
        boundary = apart[:, k - 1]
        assert torch.equal(keep[boundary].sort(1).values, expected[1][boundary].sort(1).values), "kept sets differ"
    cand = x[:, start:start + L]
    want = torch.cat([x[:, :start], cand.gather(1, keep[..., None].expand(-1, -1, x.shape[2])), x[:, start + L:]], 1)
    assert torch.equal(tokens, want)
    assert torch.equal(keep_g, gi.gather(1, keep)) and torch.equal(removed_g, gi.gather(1, removed))


# ----------------------------------------------------------------------------------------------- parity
# (shape, B, all template rows, dtype): the C++ and CUDA kernels at every tracker shape / batch /
# dtype, the interpreter on a few (it is slow) that still cover every shape, dtype and optional input.
NATIVE_CASES = [("ostrack256", 1, all_rows, dt) for all_rows in (False, True) for dt in DTYPES]
NATIVE_CASES += [("ostrack256", 32, False, torch.float32), ("ostrack256", 32, True, torch.float32),
                 ("ostrack256", 32, False, torch.bfloat16)]
NATIVE_CASES += [("ostrack384", 2, False, dt) for dt in DTYPES] + [("ostrack384", 1, True, torch.float32)]
NATIVE_CASES += [(n, 4, False, dt) for n in ("utptrack_s", "utptrack_s_ste", "odd") for dt in DTYPES]
TRITON_CASES = [("ostrack256", 1, False, torch.float32), ("ostrack256", 1, True, torch.bfloat16),
                ("ostrack384", 1, False, torch.float16), ("utptrack_s", 2, False, torch.bfloat16),
                ("utptrack_s_ste", 2, False, torch.float32), ("odd", 3, False, torch.float32),
                ("odd", 2, False, torch.bfloat16)]


def _params(cases, kernel):
    return [pytest.param(kernel, *c, id=f"{kernel}-{c[0]}-B{c[1]}-{'allrows' if c[2] else 'rows'}-{str(c[3])[6:]}")
            for c in cases if kernel in KERNELS]


# the qk interpreter runs tl.dot over every key tile of every head: B = 1 at the large shapes
TRITON_QK_CASES = [("ostrack256", 1, False, torch.float32), ("ostrack256", 1, True, torch.bfloat16),
                   ("utptrack_s", 2, False, torch.bfloat16), ("utptrack_s_ste", 1, False, torch.float32),
                   ("odd", 3, False, torch.float32), ("odd", 2, False, torch.float16)]
PARITY = _params(NATIVE_CASES, "native") + _params(TRITON_CASES, "triton") + _params(NATIVE_CASES, "cuda")
PARITY_QK = _params(NATIVE_CASES, "native") + _params(TRITON_QK_CASES, "triton") + _params(NATIVE_CASES, "cuda")


@pytest.mark.parametrize("kernel,name,B,all_rows,dtype", PARITY)
def test_topk_select_exact_parity(kernel, name, B, all_rows, dtype):
    args = make_inputs(name, B, dtype, all_rows=all_rows)
    out = call(kernel, run, args)
    assert_equal_outputs(out, reference_of(args))


@pytest.mark.parametrize("kernel,name,B,all_rows,dtype", PARITY_QK)
def test_topk_select_qk_parity(kernel, name, B, all_rows, dtype):
    args = make_inputs(name, B, dtype, all_rows=all_rows, qk=True)
    out = call(kernel, run, args, qk=True)
    assert_consistent_selection(out, args, qk=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,all_rows", [("ostrack256", False), ("ostrack256", True), ("odd", False)])
def test_topk_select_softmax_attention(kernel, name, all_rows):
    """Real post-softmax attention (not grid values): rounding order may differ from torch's."""
    B = 1 if kernel == "triton" else 2
    args = list(make_inputs(name, B, torch.float32, all_rows=all_rows))
    s = SHAPES[name]
    args[0] = torch.softmax(torch.randn(B, s.H, s.N, s.N) * 2, dim=-1)
    out = call(kernel, run, args)
    assert_consistent_selection(out, args)


def test_native_qk_matches_reference_exactly():
    """The C++ `_qk` runs the reference's own GEMM + softmax on the R rows: exact parity."""
    if "native" not in KERNELS:
        pytest.skip("needs fasttrack._C")
    args = make_inputs("ostrack256", 4, torch.float32, all_rows=True, qk=True)
    assert_equal_outputs(run(args, qk=True), reference_of(args, qk=True))


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_and_float64_inputs(kernel):
    attn, x, qi, w, bonus, gi, start, L, ratio = make_inputs("odd", 3, torch.float64)
    bonus = grid_attention((3, L), torch.float64)
    q = torch.randn(3, 3, 45, 48, dtype=torch.float64)
    k = torch.randn(3, 3, 45, 24, dtype=torch.float64)

    def strided(attn, x, qi, gi, q, k):
        """Strided views, made on the kernel's device (a move to another device would copy them)."""
        views = (attn.transpose(2, 3).contiguous().transpose(2, 3),     # a strided last dim
                 torch.cat([x, x], 2)[:, :, ::2],                       # strided channels
                 torch.cat([qi, qi], 1)[:, ::2], torch.cat([gi, gi], 1)[:, ::2],
                 q[..., ::2], k.transpose(1, 2).contiguous().transpose(1, 2))
        assert not any(t.is_contiguous() for t in views)
        return views

    def both(attn, x, qi, gi, q, k, bonus):
        a, xs, qs, gs, qv, kv = strided(attn, x, qi, gi, q, k)
        return run((a, xs, qs, w, bonus, gs, start, L, ratio)), run((qv, kv, xs, qs, w, bonus, gs, start, L, ratio, 0.2),
                                                                    qk=True)

    sel, sel_qk = call(kernel, both, attn, x, qi, gi, q, k, bonus)
    a, xs, qs, gs, qv, kv = strided(attn, x, qi, gi, q, k)
    assert_equal_outputs(sel, reference_of((a, xs, qs, w, bonus, gs, start, L, ratio)))
    assert_consistent_selection(sel_qk, (qv, kv, xs, qs, w, bonus, gs, start, L, ratio, 0.2), qk=True)


# --------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kernel", KERNELS)
def test_hand_built_ties(kernel):
    """Equal scores keep the lower index first, in keep and in removed; -0 ties with +0."""
    B, H, N, L, start = 1, 2, 12, 10, 2
    attn = torch.zeros(B, H, N, N)
    # both heads give the same candidate values: score = these (exact)
    vals = torch.tensor([0.25, 0.75, 0.75, 0.5, 0.75, 0.25, -0.0, 0.5, 0.0, 0.75])
    attn[:, :, 0, start:start + L] = vals
    x = torch.arange(N, dtype=torch.float32).view(1, N, 1).expand(B, N, 3).contiguous()
    qi = torch.zeros(B, 1, dtype=torch.long)
    sel = call(kernel, fasttrack.topk_select, attn, x, qi, 0.5, start=start, length=L)
    assert sel.keep_index.tolist() == [[1, 2, 4, 9, 3]]
    assert sel.removed_index.tolist() == [[7, 0, 5, 6, 8]]
    assert sel.tokens[0, :, 0].tolist() == [0, 1, 3, 4, 6, 11, 5]
    assert_equal_outputs(sel, reference.topk_select(attn, x, qi, None, None, None, start, L, 0.5))


@pytest.mark.parametrize("kernel", KERNELS)
def test_chained_selections_track_global_positions(kernel):
    """OSTrack's three CE layers at OSTrack-256: 256 -> 180 -> 126 -> 89 search tokens, global
    indices carried from layer to layer, every layer with its own attention."""
    B, H, C, lens_t = 2, 12, 64, 64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, lens_t + 256, C, generator=g)
    gi = torch.arange(256).expand(B, 256).contiguous()
    ours, ref = (x, gi, []), (x, gi, [])
    qi = torch.arange(lens_t).expand(B, lens_t).contiguous()
    for expected_len in (180, 126, 89):
        N = ours[0].shape[1]
        attn = grid_attention((B, H, N, N), torch.float32, generator=g)
        L = N - lens_t
        sel = call(kernel, fasttrack.topk_select, attn, ours[0], qi, 0.7, start=lens_t, global_index=ours[1])
        r = reference.topk_select(attn, ref[0], qi, None, None, ref[1], lens_t, L, 0.7)
        assert sel.keep_index.shape[1] == expected_len
        ours = (sel.tokens, sel.keep_global, ours[2] + [sel.removed_global])
        ref = (r[0], r[3], ref[2] + [r[4]])
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[0], ref[0])
    assert torch.equal(torch.cat(ours[2], 1), torch.cat(ref[2], 1))
    # kept + removed global positions still partition the 256 search positions
    allpos = torch.cat([ours[1]] + ours[2], 1).sort(1).values
    assert torch.equal(allpos, torch.arange(256).expand(B, 256))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qk", [False, True])
@pytest.mark.parametrize("ratio", [1.0, 0.99])       # ceil(0.99 * 37) = 37 as well
def test_k_equals_L_is_identity(kernel, qk, ratio):
    args = list(make_inputs("odd", 2, torch.float32, qk=qk))
    args[-2 if qk else -1] = ratio
    x, gi = args[2 if qk else 1], args[6 if qk else 5]
    sel = call(kernel, run, args, qk)
    assert torch.equal(sel.tokens, x) and sel.tokens.data_ptr() != x.data_ptr()
    assert torch.equal(sel.keep_index, torch.arange(37).expand(2, 37))
    assert sel.removed_index.shape == (2, 0) and sel.removed_global.shape == (2, 0)
    assert torch.equal(sel.keep_global, gi) and sel.keep_global.data_ptr() != gi.data_ptr()
    assert_equal_outputs(sel, reference_of(args, qk))


# ---------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qk", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(kernel, qk, dtype):
    args = list(make_inputs("utptrack_s_ste", 2, dtype, qk=qk))
    xi = 2 if qk else 1
    x = args[xi].clone().requires_grad_()
    x_ref = args[xi].clone().requires_grad_()
    out = call(kernel, run, args[:xi] + [x] + args[xi + 1:], qk)
    out_ref = reference_of(args[:xi] + [x_ref] + args[xi + 1:], qk)
    grad = torch.randn_like(out_ref[0])
    out.tokens.backward(grad)
    out_ref[0].backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert not out.keep_index.requires_grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qk", [False, True])
def test_gradcheck_float64(kernel, qk):
    # small: gradcheck perturbs every element of x (9 tokens × 3 channels × 2)
    B, H, N, C, start, L = 2, 2, 9, 3, 2, 5
    head = ((torch.randn(B, H, N, 4, dtype=torch.float64), torch.randn(B, H, N, 4, dtype=torch.float64)) if qk
            else (grid_attention((B, H, N, N), torch.float64, rows=2),))
    qi = torch.tensor([[0, 8], [1, 0]])
    rest = [qi, None, None, torch.randperm(50)[:B * L].view(B, L), start, L, 0.6] + ([0.5] if qk else [])

    def f(x):
        return call(kernel, run, [*head, x, *rest], qk).tokens

    # fast mode under the interpreter: each call costs a kernel launch there
    assert torch.autograd.gradcheck(f, (torch.randn(B, N, C, dtype=torch.float64, requires_grad=True),),
                                    fast_mode=kernel == "triton")


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch of both ops (nothing excluded)."""
    for qk in (False, True):
        args = list(make_inputs("odd", 2, torch.float32, qk=qk))
        xi = 2 if qk else 1
        args[xi] = args[xi].requires_grad_()
        op = torch.ops.fasttrack.topk_select_qk if qk else torch.ops.fasttrack.topk_select
        torch.library.opcheck(op.default, tuple(args))
        args[xi] = args[xi].detach()
        torch.library.opcheck(op.default, tuple(args))


def test_torch_compile_fullgraph():
    """Both ops inside one compiled graph (inductor), with ops around them, no graph break."""
    def block(attn, q, k, x, qi, gi):
        sel = fasttrack.topk_select(attn, x * 2, qi, 0.7, start=64, global_index=gi)
        sel_qk = fasttrack.topk_select_qk(q, k, x, qi, 0.7, start=64)
        return sel.tokens + 1, sel.keep_global, sel.removed_global, sel_qk.tokens * 2, sel_qk.keep_index

    attn, x, qi, _, _, gi, *_ = make_inputs("ostrack256", 2, torch.float32)
    q, k, *_ = make_inputs("ostrack256", 2, torch.float32, qk=True)
    compiled = torch.compile(block, fullgraph=True)
    for a, e in zip(compiled(attn, q, k, x, qi, gi), block(attn, q, k, x, qi, gi)):
        assert torch.equal(a, e)


# --------------------------------------------------------------------------------------- bad input
def _bad(args, **change):
    names = ("attn", "x", "query_index", "query_weight", "bonus", "global_index", "start", "length", "keep_ratio")
    d = dict(zip(names, args))
    d.update(change)
    return d


def _call(d):
    return fasttrack.topk_select(d["attn"], d["x"], d["query_index"], d["keep_ratio"], start=d["start"],
                                 length=d["length"], query_weight=d["query_weight"], bonus=d["bonus"],
                                 global_index=d["global_index"])


@pytest.mark.parametrize("kernel", KERNELS)
def test_query_index_out_of_range(kernel):
    """CPU kernels check on the host; on CUDA the check is a device-side assert unless
    `fasttrack.sync_checks` is on (fasttrack.backend), which gives the same ValueError."""
    args = make_inputs("odd", 2, torch.float32)
    for bad in (45, -1):
        qi = args[2].clone()
        qi[1, 2] = bad
        with fasttrack.sync_checks(), pytest.raises(ValueError, match=r"`query_index` values must be in \[0, N=45\)"):
            call(kernel, lambda *a: _call(_bad(a, query_index=qi.to(a[0].device))), *args)
        qargs = list(make_inputs("odd", 2, torch.float32, qk=True))
        qargs[3] = qi
        with fasttrack.sync_checks(), pytest.raises(ValueError, match=r"`query_index` values must be in \[0, N=45\)"):
            call(kernel, run, qargs, qk=True)


BAD = [
    (dict(start=10), r"`start \+ length` must be <= N=45"),
    (dict(length=41), r"`start \+ length` must be <= N=45"),
    (dict(bonus=torch.zeros(2, 36)), r"`bonus` must have shape \[2, 37\]"),
    (dict(bonus=torch.zeros(2, 37, dtype=torch.long)), r"`bonus` must have dtype"),
    (dict(global_index=torch.zeros(2, 37, dtype=torch.int32)), r"`global_index` must have dtype"),
    (dict(query_weight=torch.ones(2, 2)), r"`query_weight` must have shape \[2, 3\]"),
    (dict(keep_ratio=0.0), r"`keep_ratio` must be in \(0, 1\]"),
    (dict(keep_ratio=1.5), r"`keep_ratio` must be in \(0, 1\]"),
    (dict(attn=torch.zeros(2, 3, 45, 45, dtype=torch.int32)), r"`attn` must have dtype"),
    (dict(attn=torch.zeros(2, 3, 45, 44)), r"`attn` must be \[B, H, N, N\]"),
    (dict(x=torch.zeros(2, 44, 50)), r"`x` has 44 tokens but the attention is over 45"),
    (dict(query_index=torch.zeros(2, 3)), r"`query_index` must have dtype"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[str(list(c)[0]) + str(i) for i, (c, _) in enumerate(BAD)])
def test_bad_input_clear_error(change, match):
    args = make_inputs("odd", 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        _call(_bad(args, **change))


def test_native_op_checks_without_the_wrapper():
    """torch.ops.fasttrack.* bypasses the Python checks: the C++ kernel must refuse on its own."""
    if "native" not in KERNELS:
        pytest.skip("needs fasttrack._C")
    attn, x, qi, w, bonus, gi, start, L, ratio = make_inputs("utptrack_s_ste", 2, torch.float32)
    op = torch.ops.fasttrack.topk_select
    cases = [((attn, x, qi, w, bonus, gi, 250, L, ratio), "`start \\+ length` <= N=296"),
             ((attn, x, qi, w, bonus[:, 1:], gi, start, L, ratio), "`bonus` must be a floating \\[B=2, L=49\\]"),
             ((attn, x, qi + 1, w, bonus, gi, start, L, ratio), "`query_index` values must be in \\[0, N=296\\)"),
             ((attn, x, qi - 300, w, bonus, gi, start, L, ratio), "`query_index` values must be in"),
             ((attn, x, qi, w, bonus, gi, start, L, 0.0), "`keep_ratio` must be in"),
             ((attn, x, qi, w, bonus, gi, start, L, 1.5), "`keep_ratio` must be in"),
             ((attn.int(), x, qi, w, bonus, gi, start, L, ratio), "`attn` must be a floating"),
             ((attn, x[:, 1:], qi, w, bonus, gi, start, L, ratio), "`x` must be"),
             ((attn, x, qi, w[:, :1], bonus, gi, start, L, ratio), "`query_weight` must be"),
             ((attn, x, qi.int(), w, bonus, gi, start, L, ratio), "`query_index` must be an int64"),
             ((attn, x, qi, w, bonus, gi.int(), start, L, ratio), "`global_index` must be an int64")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args)
    q, k, *_ = make_inputs("utptrack_s_ste", 2, torch.float32, qk=True)
    with pytest.raises(ValueError, match="`k` must be a floating tensor of q's shape"):
        torch.ops.fasttrack.topk_select_qk(q, k[:, :2], x, qi, w, bonus, gi, start, L, ratio, 0.2)
    with pytest.raises(ValueError, match="`query_index` values must be in"):
        torch.ops.fasttrack.topk_select_qk(q, k, x, qi + 1, w, bonus, gi, start, L, ratio, 0.2)


def test_triton_length_limit():
    from fasttrack.kernels.topk_select import MAX_LENGTH
    N = MAX_LENGTH + 2
    attn, x = torch.zeros(1, 1, N, N), torch.zeros(1, N, 4)
    qi = torch.zeros(1, 1, dtype=torch.long)
    with fasttrack.use_backend("triton"), pytest.raises(ValueError, match=f"`length` <= {MAX_LENGTH}"):
        fasttrack.topk_select(attn, x, qi, 0.5, start=1)
    if "native" in KERNELS:  # the C++ kernel has no such limit
        sel = fasttrack.topk_select(attn, x, qi, 0.5, start=1)
        assert sel.keep_index.shape == (1, math.ceil(0.5 * (N - 1)))
