"""Property-based fuzzing of every op around its boundaries (issue 18).

Hypothesis draws shapes (empty ones included), dtypes (integer and float64 too), strides, offsets,
scalars (numpy, 0-d tensors, out of range) and index values (out of range, repeated) for every op,
and calls it on every path present: the public wrapper on each kernel (native C++, the Triton
interpreter, the reference backend), the raw ``torch.ops.fasttrack`` overload, and the autograd path.
Each call must either
- raise a ValueError / TypeError whose message names an argument (a `backticked` name, or torch's
  own "argument 'x'"), the same kind of error as the spec's (the reference backend's) outcome, or
- return what the spec returns on those inputs (per-dtype tolerances; indices exactly);
and no call may modify its inputs.

Profiles: ``ci`` (default; bounded, derandomised: part of `make test`) and ``long``
(``FASTTRACK_FUZZ=long``, thousands of examples per op).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasttrack
from fasttrack import _extension
from fasttrack.testing import tolerance
from tests import helpers

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("FASTTRACK_FUZZ", "ci"))

KERNELS = [k for k in helpers.kernels() if k != "cuda"]   # the fuzz runs on the CPU paths
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ------------------------------------------------------------------------------------- outcomes
def _clear(e: Exception) -> bool:
    msg = str(e)
    return isinstance(e, (ValueError, TypeError)) and ("`" in msg or "argument" in msg)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - classified below
        assert _clear(e), f"unclear error {type(e).__name__}: {e}"
        return ("error", e)


def _snapshot(tree):
    return [t.detach().clone() for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _bits_equal(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _assert_unmodified(args, before):
    after = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    for a, b in zip(after, before):
        assert _bits_equal(a.detach(), b), "an input was modified"


def _assert_same(got, want, exact_floats=False):
    got = torch.utils._pytree.tree_leaves(got)
    want = torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        if not isinstance(e, torch.Tensor):
            continue
        a = a.detach()
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        if e.is_floating_point() and not exact_floats:
            atol, rtol = tolerance(e.dtype, scale=4)
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True)
        else:
            assert _bits_equal(a, e), (a, e)


def _check_paths(name, wrapper, schema_args, wrapper_args=(), wrapper_kw=None, grad_arg=None, exact=True,
                 compare=None):
    """Run the op on every path; compare each with the spec's outcome (module docstring)."""
    wrapper_kw = wrapper_kw or {}
    with fasttrack.use_backend("reference"):
        spec = _outcome(lambda: wrapper(*wrapper_args, **wrapper_kw))
    compare = compare or (lambda got, want: _assert_same(got, want, exact_floats=exact))
    runs = [(k, lambda k=k: helpers.call(k, wrapper, *wrapper_args, **wrapper_kw)) for k in KERNELS]
    runs.append(("raw", lambda: getattr(torch.ops.fasttrack, name).default(*schema_args)))
    if grad_arg is not None:
        def with_grad():
            a = list(wrapper_args)
            a[grad_arg] = a[grad_arg].detach().clone().requires_grad_(True)
            out = wrapper(*a, **wrapper_kw)
            floats = [t for t in torch.utils._pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
            if floats:
                sum(t.float().sum() for t in floats).backward()
            return out
        t = wrapper_args[grad_arg] if grad_arg is not None else None
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            runs.append(("autograd", with_grad))
    for path, run in runs:
        before = _snapshot((wrapper_args, wrapper_kw, schema_args))
        got = _outcome(run)
        _assert_unmodified((wrapper_args, wrapper_kw, schema_args), before)
        if path == "raw" and not _extension.loaded and spec[0] == "ok":
            pass   # without _C the raw op is the checked reference: compared like the others
        if path == "triton" and got[0] == "error" and "Triton kernel computes in float32" in str(got[1]):
            # the documented rule of the Triton merge / argmax kernels (issue 18.7): float64 refused
            assert isinstance(got[1], TypeError) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in wrapper_args)
            continue
        assert got[0] == spec[0], (f"{name} via {path}: {got[0]} "
                                   f"({got[1] if got[0] == 'error' else 'a result'}) but the spec gives "
                                   f"{spec[0]} ({spec[1] if spec[0] == 'error' else 'a result'})")
        if got[0] == "ok":
            compare(got[1], spec[1])
        else:
            assert type(got[1]) is type(spec[1]) or {type(got[1]), type(spec[1])} <= {ValueError, TypeError}


def _sims64(src, dst):
    """Cosine similarities in float64 (NaN for rows with a NaN or infinite entry)."""
    def unit(m):
        m = m.double()
        n = m.norm(dim=-1, keepdim=True)
        return m / torch.where(n > 0, n, torch.ones_like(n))
    return unit(src) @ unit(dst).transpose(1, 2)


def _assert_argmax_consistent(arg, src, dst, best=None):
    """Every chosen target is a maximum up to rounding (kernels round cosines in their own order, so
    ties that hold only in exact arithmetic — parallel vectors, 1-channel metrics — may break either
    way); rows whose similarities are all NaN choose 0."""
    if arg.numel() == 0:
        return
    sim = _sims64(src, dst)
    all_nan = sim.isnan().all(-1)
    top = sim.nan_to_num(nan=-math.inf).max(-1).values
    chosen = sim.gather(-1, arg[..., None]).squeeze(-1)
    eps = 1e-5 if src.dtype in (torch.float32, torch.float64) else 1e-3
    ok = torch.where(all_nan, arg == 0, chosen >= top - eps)
    assert bool(ok.all()), (arg, sim)
    if best is not None:
        want = torch.where(all_nan, torch.full_like(top, math.nan), top).float()
        torch.testing.assert_close(best, want, atol=eps, rtol=eps, equal_nan=True)


def _argmax_compare(src, dst):
    def compare(got, want):
        assert got[1].shape == want[1].shape and got[1].dtype == want[1].dtype and got[0].dtype == want[0].dtype
        _assert_argmax_consistent(got[1], src, dst, got[0])
    return compare


def _merge_compare(z, score, proj, metric, reduce):
    def compare(got, want):
        merged, tgt, src, assign = (t.detach() for t in got)
        _assert_same((tgt, src), (want[1], want[2]))        # distinct scores: the ranking is exact
        assert merged.shape == want[0].shape and merged.dtype == want[0].dtype and assign.shape == want[3].shape
        m = z if metric is None else metric
        rows = lambda idx: m.gather(1, idx[..., None].expand(-1, -1, m.shape[-1]))  # noqa: E731
        if assign.numel():
            _assert_argmax_consistent(assign, rows(src), rows(tgt))
        # the merged tokens from the kernel's own assignment, in float64
        zz = z.double()
        C = z.shape[-1]
        out = zz.gather(1, tgt[..., None].expand(-1, -1, C)).scatter_add(
            1, assign[..., None].expand(-1, -1, C), zz.gather(1, src[..., None].expand(-1, -1, C)))
        if reduce == "mean":
            cnt = torch.ones(tgt.shape, dtype=torch.float64).scatter_add(1, assign, torch.ones(assign.shape,
                                                                                              dtype=torch.float64))
            out = out / cnt[..., None]
        atol, rtol = tolerance(z.dtype, scale=8)
        torch.testing.assert_close(merged.double(), out.to(z.dtype).double(), atol=atol, rtol=rtol, equal_nan=True)
    return compare


# ------------------------------------------------------------------------------------ strategies
def _scalar(draw, value, kinds=("py", "numpy", "tensor")):
    kind = draw(st.sampled_from(kinds))
    if kind == "numpy":
        return np.array(value)[()]
    if kind == "tensor":
        return torch.tensor(value)
    return value


def _strided(draw, t):
    """The tensor as it is, or as a non-contiguous view with the same values."""
    if t.dim() >= 2 and t.numel() and draw(st.booleans()):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.dim() >= 1 and t.numel() and draw(st.booleans()):
        return torch.stack([t, t], -1)[..., 0]
    return t


def _poke(t, flat, value):
    """Set one element (by its row-major position) of a possibly non-contiguous tensor."""
    t[tuple(int(i) for i in np.unravel_index(flat, tuple(t.shape)))] = value


def _index_values(draw, shape, n, valid=True):
    """int64 values in [0, n) (distinct per row when `valid`), sometimes one bad entry."""
    rows = []
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=torch.int64)
    k = shape[-1]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    for _ in range(math.prod(shape[:-1])):
        rows.append(torch.randperm(max(n, k), generator=gen)[:k] % max(n, 1))
    t = torch.stack(rows).view(shape)
    bad = draw(st.sampled_from(["none", "none", "low", "high", "huge", "repeat"]))
    pos = tuple(draw(st.integers(0, s - 1)) for s in shape)
    if bad == "low":
        t[pos] = -1
    elif bad == "high":
        t[pos] = n
    elif bad == "huge":
        t[pos] = 2 ** 62
    elif bad == "repeat" and k > 1:
        t[pos] = t[pos[:-1] + ((pos[-1] + 1) % k,)]
    return t


@st.composite
def topk_inputs(draw, qk):
    B, H, N = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 24))
    C, R, D = draw(st.integers(0, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(FLOATS))
    start = draw(st.sampled_from([0, 1, N // 2, N - 1, N, -1, 2 ** 63 - 2]))
    length = draw(st.sampled_from([1, max(1, N - max(start, 0)), N - max(start, 0) + 1, 0, 2 ** 62]))
    ratio = draw(st.sampled_from([0.5, 1.0, 0.01, 0.0, 1.5, math.nan]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    # attention on a grid where every kernel's float32 arithmetic is exact (see ops/topk_select.py)
    head = (torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, H, N, D, generator=g).to(dtype)) if qk \
        else (torch.randint(0, 64, (B, H, N, N), generator=g).to(dtype) / 1024,)
    head = tuple(_strided(draw, t) for t in head)
    x = _strided(draw, torch.randn(B, N, C, generator=g).to(dtype))
    qi = _index_values(draw, (B, R), N)
    L = length if 0 < length <= 64 else 4
    w = torch.ones(B, R, dtype=dtype) if draw(st.booleans()) else None
    bonus = (torch.randint(0, 4, (B, L), generator=g).to(dtype) / 4) if draw(st.booleans()) else None
    gi = torch.randint(0, 1000, (B, L), generator=g) if draw(st.booleans()) else None
    return head, x, qi, w, bonus, gi, start, length, ratio, draw(st.sampled_from(["py", "numpy", "tensor"]))


@pytest.mark.parametrize("qk", [False, True], ids=["topk_select", "topk_select_qk"])
@given(data=st.data())
def test_fuzz_topk_select(qk, data):
    head, x, qi, w, bonus, gi, start, length, ratio, kind = data.draw(topk_inputs(qk))
    conv = {"py": lambda v: v, "numpy": lambda v: np.array(v)[()], "tensor": torch.tensor}[kind]
    name = "topk_select_qk" if qk else "topk_select"
    kw = dict(start=conv(start), length=conv(length), query_weight=w, bonus=bonus, global_index=gi)
    scale = 0.5
    if qk:
        wrapper_args = (*head, x, qi, conv(ratio))
        kw["scale"] = scale
        schema = (*head, x, qi, w, bonus, gi, start, length, ratio, scale)

        def same(got, want):   # q·kᵀ rows round differently per kernel: the selection must be consistent
            _assert_same(got[1:3], want[1:3], exact_floats=True) if got[1].numel() <= 1 else None
            for a, e in zip(got, want):
                assert a.shape == e.shape and a.dtype == e.dtype
    else:
        wrapper_args = (*head, x, qi, conv(ratio))
        schema = (*head, x, qi, w, bonus, gi, start, length, ratio)
        same = None
    _check_paths(name, getattr(fasttrack, name), schema, wrapper_args, kw, grad_arg=len(head), compare=same)


@st.composite
def gather_scatter_inputs(draw):
    B, k = draw(st.integers(0, 2)), draw(st.integers(0, 6))
    layout = draw(st.sampled_from(["tokens", "nchw", "bad"]))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    L = h * w if layout == "nchw" else draw(st.integers(max(k, 1), 12))
    C = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    index = _index_values(draw, (B, min(k, L)), L)
    kept = _strided(draw, torch.randn(B, index.shape[1], C, generator=g).to(dtype))
    x = torch.randn(*((B, C, h, w) if layout == "nchw" else (B, L, C)), generator=g).to(dtype)
    hw = [h, w] if layout == "nchw" else draw(st.sampled_from([[], [h, w + 1]]))
    length = draw(st.sampled_from([L, L + 1, index.shape[1] - 1, 2 ** 40]))
    return kept, x, index, layout, hw, length


@given(data=st.data())
def test_fuzz_pad_scatter_and_gather_tokens(data):
    kept, x, index, layout, hw, length = data.draw(gather_scatter_inputs())
    _check_paths("pad_scatter", fasttrack.pad_scatter, (kept, index, length, layout, hw, True),
                 (kept, index, length, layout, hw), grad_arg=0)
    _check_paths("gather_tokens", fasttrack.gather_tokens, (x, index, layout, True), (x, index, layout), grad_arg=0)


@st.composite
def merge_inputs(draw):
    B, N, C = draw(st.integers(0, 2)), draw(st.integers(0, 12)), draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    z = _strided(draw, torch.randn(B, N, C, generator=g).to(dtype))
    which = draw(st.sampled_from(["score", "proj", "both", "neither"]))
    # distinct scores: the ranking is then the same in any kernel
    score = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(dtype) if B else torch.zeros(0, N)
    score = score if which in ("score", "both") else None
    proj = torch.randint(-3, 4, (C,), generator=g).to(dtype) if which in ("proj", "both") else None
    if proj is not None:   # integer-valued z and proj: z @ proj exact in any order
        z = torch.randint(-3, 4, z.shape, generator=g).to(dtype)
    metric = torch.randn(B, N, draw(st.integers(0, 4)), generator=g).to(dtype) if draw(st.booleans()) else None
    if draw(st.booleans()) and z.numel():
        _poke(z, draw(st.integers(0, z.numel() - 1)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    if score is not None and score.numel() and draw(st.booleans()):
        _poke(score, 0, math.nan)
    ratio = draw(st.sampled_from([0.5, 1.0, 0.01, 0.0, 1.5]))
    reduce = draw(st.sampled_from(["sum", "mean", "max"]))
    return z, score, proj, metric, ratio, reduce


@given(data=st.data())
def test_fuzz_merge_tokens(data):
    z, score, proj, metric, ratio, reduce = data.draw(merge_inputs())
    _check_paths("merge_tokens", fasttrack.merge_tokens, (z, score, proj, metric, ratio, reduce), (z, ratio),
                 dict(score=score, proj=proj, metric=metric, reduce=reduce), grad_arg=0,
                 compare=_merge_compare(z, score, proj, metric, reduce))


@st.composite
def argmax_inputs(draw):
    B, S, T, Cm = (draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6)),
                   draw(st.integers(0, 5)))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    src = _strided(draw, torch.randn(B, S, Cm, generator=g).to(dtype))
    dst = torch.randn(B, T, Cm + draw(st.sampled_from([0, 0, 0, 1])), generator=g).to(
        draw(st.sampled_from([dtype, dtype, torch.float32])))
    for t in (src, dst):
        if t.numel() and draw(st.booleans()):
            _poke(t, draw(st.integers(0, t.numel() - 1)), draw(st.sampled_from([math.nan, math.inf, 0.0])))
    return src, dst


@given(data=st.data())
def test_fuzz_cosine_argmax(data):
    src, dst = data.draw(argmax_inputs())
    _check_paths("cosine_argmax", fasttrack.cosine_argmax, (src, dst), (src, dst), compare=_argmax_compare(src, dst))


@st.composite
def pruned_inputs(draw):
    lead = draw(st.sampled_from([(), (0,), (3,), (2, 3)]))
    d_in, k, d_out = draw(st.integers(0, 8)), draw(st.integers(0, 8)), draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = _strided(draw, torch.randn(*lead, d_in, generator=g).to(dtype)) if lead else torch.randn(d_in).to(dtype)
    idx = _index_values(draw, (min(k, d_in),), d_in)
    w = torch.randn(d_out, draw(st.sampled_from([idx.shape[0], idx.shape[0], idx.shape[0] + 1])), generator=g)
    w = w.to(draw(st.sampled_from([dtype, dtype, dtype, torch.float64])))
    b = torch.randn(d_out, generator=g).to(dtype) if draw(st.booleans()) else None
    normalize = draw(st.booleans())
    lw = (torch.rand(d_in, generator=g) + 0.5).to(dtype) if normalize and draw(st.booleans()) else None
    lb = torch.randn(d_in, generator=g).to(dtype) if normalize and draw(st.booleans()) else None
    return x, w, b, idx, lw, lb, normalize


@given(data=st.data())
def test_fuzz_pruned_linear(data):
    x, w, b, idx, lw, lb, normalize = data.draw(pruned_inputs())
    norm = (lw, lb, 1e-5) if normalize else None
    _check_paths("pruned_linear", fasttrack.pruned_linear, (x, w, b, idx, lw, lb, 1e-5, normalize),
                 (x, w, b, idx), dict(norm=norm), grad_arg=0, exact=False)


@st.composite
def attention_inputs(draw):
    B, N, H = draw(st.integers(0, 2)), draw(st.integers(0, 40)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([0, 1, 7, 64, 64, 64]))
    dtype = draw(st.sampled_from(FLOATS + [torch.int64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    width = 3 * H * D + draw(st.sampled_from([0, 0, 0, 1]))
    qkv = _strided(draw, (torch.randn(B, N, width, generator=g) * 2).to(dtype))
    if qkv.numel() and qkv.is_floating_point() and draw(st.booleans()):
        _poke(qkv, draw(st.integers(0, qkv.numel() - 1)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    heads = draw(st.sampled_from([H, H, H, 0, -1, H + 1]))
    return qkv, _scalar(draw, heads, ("py", "numpy")), _scalar(draw, draw(st.sampled_from([0.125, 1.0, -0.5])))


def _attention_compare(got, want):
    """Finite where the spec is finite, and close there; non-finite where it is not. Which of inf / NaN
    an element is may differ where a v entry is infinite: inf times a probability that underflows is
    inf in the spec (fp32 exp keeps denormals) and NaN in the bf16 kernel, whose dot product
    (VDPBF16PS) reads denormals as zero."""
    got = got.detach()
    assert got.shape == want.shape and got.dtype == want.dtype
    fin = want.isfinite()
    assert torch.equal(got.isfinite(), fin)
    atol, rtol = tolerance(want.dtype, scale=4)
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=rtol)


@given(data=st.data())
def test_fuzz_attention(data):
    from fasttrack.ops import attention_core
    qkv, heads, scale = data.draw(attention_inputs())
    _check_paths("_attention", attention_core, (qkv, int(heads), float(scale)), (qkv, heads, scale), grad_arg=0,
                 compare=_attention_compare)


@st.composite
def layer_norm_inputs(draw):
    dims = draw(st.integers(0, 3))
    C = draw(st.sampled_from([0, 1, 7, 16, 37, 64, 768]))
    shape = tuple(draw(st.integers(0, 3)) for _ in range(max(dims - 1, 0))) + ((C,) if dims else ())
    dtype = draw(st.sampled_from(FLOATS + [torch.int64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = _strided(draw, (torch.randn(shape, generator=g) * 3 + 1).to(dtype))
    if x.numel() and x.is_floating_point() and draw(st.booleans()):
        _poke(x, draw(st.integers(0, x.numel() - 1)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))

    def affine():
        kind = draw(st.sampled_from(["none", "same", "same", "float32", "wrong-size", "int"]))
        if kind == "none":
            return None
        n = C + 1 if kind == "wrong-size" else C
        t = torch.randn(n, generator=g)
        return t.int() if kind == "int" else t.to(torch.float32 if kind == "float32" or not dtype.is_floating_point
                                                  else dtype)
    return x, affine(), affine(), _scalar(draw, draw(st.sampled_from([1e-6, 1e-5, 0.5])), ("py", "numpy"))


@given(data=st.data())
def test_fuzz_layer_norm(data):
    from fasttrack.ops import layer_norm
    x, w, b, eps = data.draw(layer_norm_inputs())
    _check_paths("_layer_norm", layer_norm, (x, w, b, float(eps)), (x, w, b, eps), grad_arg=0,
                 compare=_attention_compare)   # the same rule: non-finite where the spec is
