"""`fasttrack.pruned_linear`: parity with `fasttrack.reference.pruned_linear` (and with ABTrack's masked
dense statement) on the native CPU kernel and the Triton kernel (interpreter), forward and backward,
gradcheck, opcheck, torch.compile, bad input; and the `PrunedLinear` module's two paths."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttrack
from fasttrack import _extension, reference
from fasttrack.backend import use_backend
from fasttrack.nn.pruned import PrunedLinear
from tests import helpers
from tolerances import TOL, assert_close

native_only = pytest.mark.skipif(not _extension.loaded, reason="the native CPU kernel needs fasttrack._C")
KERNELS = helpers.kernels()
LOW = (torch.float16, torch.bfloat16)


def _index(d_in, k, sort=True):
    idx = torch.randperm(d_in)[:k]
    return idx.sort().values if sort else idx


def _make(M, d_in, k, d_out, dtype, bias=True, ln=False, contiguous=True, lead=()):
    """Weights scaled so outputs are O(1), as in a trained layer."""
    shape = (*lead, M, d_in) if lead else (M, d_in)
    # strided view made after the cast (`.to` would copy it contiguous)
    x = torch.randn(*shape[:-1], d_in * 2).to(dtype)[..., ::2] if not contiguous else torch.randn(shape).to(dtype)
    w = torch.randn(d_out, k) * k ** -0.5
    b = torch.randn(d_out) * 0.1 if bias else None
    norm = (torch.randn(d_in) * 0.2 + 1, torch.randn(d_in) * 0.1) if ln else (None, None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return x, cast(w), cast(b), _index(d_in, k, sort=k % 2 == 0), *map(cast, norm), 1e-5, ln


def _run(kernel, args):
    return helpers.call(kernel, fasttrack.ops.dispatch, "pruned_linear", *args)


def _tol_scale(dtype, ln):
    # The fused LayerNorm rounds the normalised kept tile to x's dtype before the GEMM (as an unfused
    # LayerNorm in that dtype would, and as the tensor-core dot needs), where the reference keeps it in
    # fp32: one more rounding of the inputs, so twice the one-rounding tolerance for fp16/bf16.
    return 2.0 if (ln and dtype in LOW) else 1.0


# (M, d_in, kept, d_out, ln, bias): the grid, sampled — ViT-B (768; kept 540 = 45·12
# head-aligned, 384, 389 not), DeiT-tiny (192), odd (50); d_out ∈ {768, 2304, 3072, 33}; M ∈ {1, 320, 32·320}
NATIVE_CASES = [
    (320, 768, 540, 2304, True, True),
    (320, 768, 540, 768, False, True),
    (1, 768, 384, 3072, True, True),
    (320, 768, 389, 33, False, False),
    (320, 192, 96, 768, True, True),
    (1, 192, 131, 2304, False, True),
    (7, 50, 37, 33, True, False),
    (320, 50, 50, 3072, True, True),
]


@pytest.mark.parametrize("kernel", helpers.kernels(triton=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: "M{}-{}-{}-{}{}{}".format(
    c[0], c[1], c[2], c[3], "-ln" if c[4] else "", "" if c[5] else "-nobias"))
def test_forward_parity_tracker_shapes(kernel, case, dtype):
    """The C++ kernel, and the compiled Triton kernel on a CUDA device."""
    M, d_in, k, d_out, ln, bias = case
    args = _make(M, d_in, k, d_out, dtype, bias=bias, ln=ln, lead=(2,) if M == 7 else ())
    out = _run(kernel, args)
    assert out.dtype == dtype and out.shape == (*args[0].shape[:-1], d_out)
    assert_close(out, reference.pruned_linear(*args), scale=_tol_scale(dtype, ln))


@native_only
def test_native_forward_large_batch():
    """B=32 OSTrack-256 (M = 32·320) through norm2 → fc1."""
    args = _make(32 * 320, 768, 540, 3072, torch.float32, ln=True)
    assert_close(_run("native", args), reference.pruned_linear(*args))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_non_contiguous_x(kernel, dtype, ln):
    x, *rest = _make(9, 50, 37, 33, dtype, ln=ln, contiguous=False, lead=(3,))
    assert not x.is_contiguous()
    xt = torch.randn(9, 3, 50).to(dtype).transpose(0, 1)      # leading dims that cannot be merged

    def strided_on_device(x, xt, *rest):   # a move to another device copies views contiguous
        views = (torch.stack([x, x], -1)[..., 0], xt.transpose(0, 1).contiguous().transpose(0, 1))
        assert not any(v.is_contiguous() for v in views)
        return [fasttrack.ops.dispatch("pruned_linear", v, *rest) for v in views]

    got = helpers.call(kernel, strided_on_device, x, xt, *rest)
    for xx, out in zip((x, xt), got):
        assert_close(out, reference.pruned_linear(xx, *rest), scale=_tol_scale(dtype, ln))


# interpreter cases: small M·d_out (each program is interpreted in numpy)
TRITON_CASES = [
    (33, 768, 540, 64, True, True),
    (1, 768, 384, 96, False, True),
    (65, 192, 96, 70, True, True),
    (17, 192, 131, 33, False, False),
    (7, 50, 37, 33, True, False),
]


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton interpreter runs only without a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "M{}-{}-{}-{}{}{}".format(
    c[0], c[1], c[2], c[3], "-ln" if c[4] else "", "" if c[5] else "-nobias"))
def test_triton_forward_parity(case, dtype):
    M, d_in, k, d_out, ln, bias = case
    args = _make(M, d_in, k, d_out, dtype, bias=bias, ln=ln)
    out = _run("triton", args)
    assert out.dtype == dtype and out.shape == (M, d_out)
    assert_close(out, reference.pruned_linear(*args), scale=_tol_scale(dtype, ln))


@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_masked_dense_statement(kernel):
    """ABTrack's ``(x·D) @ Wᵀ + b`` with the dense weight equals the pruned product."""
    d_in, d_out = 192, 70
    x, dense = torch.randn(2, 11, d_in), torch.randn(d_out, d_in) * 0.1
    b = torch.randn(d_out)
    idx = _index(d_in, 96)
    mask = torch.zeros(d_in).index_fill_(0, idx, 1)
    args = (x, dense.index_select(1, idx).contiguous(), b, idx, None, None, 1e-5, False)
    assert_close(_run(kernel, args), reference.masked_dense_linear(x, dense, b, mask))


def _grads(fn, args, positions, upstream):
    args = [a.detach().clone().requires_grad_() if i in positions else a for i, a in enumerate(args)]
    out = fn(*args)
    (out.float() * upstream).sum().backward()
    return out.detach(), [args[i].grad for i in positions]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ln,bias", [(True, True), (False, True), (True, False)], ids=["ln", "plain", "ln-nobias"])
def test_backward_parity(kernel, dtype, ln, bias):
    M, d_in, k, d_out = (65, 192, 96, 70) if kernel == "triton" else (320, 768, 540, 768)
    args = _make(M, d_in, k, d_out, dtype, bias=bias, ln=ln, lead=(2,))
    if ln:   # no affine bias with this case: ln_weight only, the gradient for it still flows
        args = (*args[:5], None if not bias else args[5], *args[6:])
    pos = [i for i in (0, 1, 2, 4, 5) if args[i] is not None]
    upstream = torch.randn(*args[0].shape[:-1], d_out)
    out, got = _grads(lambda *a: _run(kernel, a), args, pos, upstream)
    ref_out, want = _grads(reference.pruned_linear, args, pos, upstream)
    assert_close(out, ref_out, scale=_tol_scale(dtype, ln))
    for i, g, e in zip(pos, got, want):
        assert g is not None and g.dtype == args[i].dtype, i
        # weight / LN-affine grads sum over M = 2·320 rows: widen for the summation order
        assert_close(g, e, scale=(4 if dtype == torch.float32 else 2) * _tol_scale(dtype, ln))
    # the x-gradient is exactly zero on pruned dims when the LayerNorm is not fused
    if not ln:
        pruned = torch.ones(d_in, dtype=torch.bool).index_fill_(0, args[3], False)
        assert torch.all(got[0][..., pruned] == 0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_gradcheck_float64(kernel, ln):
    args = list(_make(5, 12, 7, 6, torch.float64, ln=ln))
    pos = [0, 1, 2] + ([4, 5] if ln else [])
    for i in pos:
        args[i] = args[i].detach().requires_grad_()

    def fn(*diff):
        a = list(args)
        for i, t in zip(pos, diff):
            a[i] = t
        return _run(kernel, a)

    # fast_mode for the interpreter: a random projection of the Jacobian, not all ~130 columns
    assert torch.autograd.gradcheck(fn, [args[i] for i in pos], eps=1e-6, atol=1e-7, fast_mode=kernel == "triton")


@native_only
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_opcheck(ln):
    args = _make(9, 50, 37, 33, torch.float32, ln=ln, lead=(2,))
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(torch.ops.fasttrack.pruned_linear.default, args)


@native_only
def test_opcheck_gather_helper():
    x, ln_w, ln_b = torch.randn(2, 9, 50), torch.randn(50), torch.randn(50)
    idx = _index(50, 37)
    torch.library.opcheck(torch.ops.fasttrack._pruned_linear_gather.default, (x, idx, ln_w, ln_b, 1e-5, True))
    want = F.layer_norm(x, (50,), ln_w, ln_b, 1e-5).index_select(-1, idx).reshape(-1, 37)
    assert_close(torch.ops.fasttrack._pruned_linear_gather(x, idx, ln_w, ln_b, 1e-5, True), want)
    # inference-only: a backward through it raises instead of returning a wrong (zero) gradient
    out = torch.ops.fasttrack._pruned_linear_gather(x.requires_grad_(), idx, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d_in,k,order", [(768, 540, "sorted"), (768, 540, "shuffled"), (50, 37, "sorted"),
                                          (13, 13, "sorted"), (7, 3, "sorted"), (768, 1, "sorted"),
                                          (64, 8, "last")])
def test_gather_phase_layouts(d_in, k, order, dtype):
    """The gather phase's row paths (CPU dispatch rule in csrc/cpu/pruned_linear_kernel.cpp: ascending kept
    dims of a contiguous fp32/bf16 row take the AVX2 pack plan, anything else the per-element loop)
    against index_select: exact without LayerNorm (NaN payloads and infinities included), within
    the one-rounding tolerance with it; d_in with and without a remainder of 8, a plan whose last
    blocks have less than 8 lanes of room, unsorted indices, strided rows."""
    g = torch.Generator().manual_seed(d_in * 1000 + k)
    idx = torch.randperm(d_in, generator=g)[:k]
    idx = {"sorted": idx.sort().values, "shuffled": idx, "last": torch.arange(d_in - k, d_in)}[order]
    x = torch.randn(5, 2 * d_in, generator=g).to(dtype)
    x.view(torch.int16 if dtype != torch.float32 else torch.int32)[0, :3] = torch.tensor([-1, 0x7FC1, 0x7F81]) \
        if dtype != torch.float32 else torch.tensor([-1, 0x7FC00001, 0x7F800001], dtype=torch.int32)
    x[1, 1], x[1, 2] = float("inf"), -float("inf")
    ln_w, ln_b = torch.randn(d_in, generator=g).to(dtype), torch.randn(d_in, generator=g).to(dtype)
    for rows in (x[:, :d_in], x[:, ::2]):   # contiguous rows, strided rows
        got = torch.ops.fasttrack._pruned_linear_gather(rows, idx, None, None, 1e-5, False)
        assert torch.equal(got.view(torch.uint8), rows.index_select(-1, idx).contiguous().view(torch.uint8))
        finite = rows[2:]
        got = torch.ops.fasttrack._pruned_linear_gather(finite, idx, ln_w, ln_b, 1e-5, True)
        want = F.layer_norm(finite.float(), (d_in,), ln_w.float(), ln_b.float(), 1e-5).index_select(-1, idx)
        assert_close(got, want.to(dtype))


@native_only
def test_torch_compile_fullgraph():
    args = _make(20, 50, 37, 33, torch.float32, ln=True)
    x, w, b, idx, lw, lb, eps, _ = args

    def f(x, w, b, idx, lw, lb):
        return torch.relu(fasttrack.pruned_linear(x, w, b, idx, norm=(lw, lb, eps)))

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, w, b, idx, lw, lb)
    assert_close(out, torch.relu(reference.pruned_linear(*args)))


@native_only
def test_torch_compile_module():
    lin = nn.Linear(50, 33)
    m = PrunedLinear.from_dense(lin, _index(50, 37), norm=nn.LayerNorm(50))
    x = torch.randn(3, 7, 50)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(m, fullgraph=True)(x), m(x))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, from the wrapper, the launchers and direct op calls
# ---------------------------------------------------------------------------------------------
def _good():
    return dict(x=torch.randn(4, 50), weight=torch.randn(33, 5), bias=torch.randn(33),
                in_index=torch.tensor([0, 7, 3, 49, 12]), ln_weight=torch.randn(50), ln_bias=torch.randn(50))


def _call_wrapper(kw):
    return fasttrack.pruned_linear(kw["x"], kw["weight"], kw["bias"], kw["in_index"],
                                   norm=(kw["ln_weight"], kw["ln_bias"], 1e-5))


def _call_op(kw):
    return torch.ops.fasttrack.pruned_linear(kw["x"], kw["weight"], kw["bias"], kw["in_index"], kw["ln_weight"],
                                             kw["ln_bias"], 1e-5, True)


BAD_META = [
    ("weight", dict(weight=torch.randn(33, 6)), r"weight.shape\[1\]"),
    ("bias", dict(bias=torch.randn(32)), "`bias`"),
    ("ln_weight", dict(ln_weight=torch.randn(49)), "`ln_weight`"),
    ("ln_bias", dict(ln_bias=torch.randn(51)), "`ln_bias`"),
    ("weight_dtype", dict(weight=torch.randn(33, 5, dtype=torch.float64)), "`weight`"),
    ("index_dtype", dict(in_index=torch.tensor([0, 7, 3, 49, 12], dtype=torch.int32)), "`in_index`"),
]
BAD_VALUES = [
    ("out_of_range", dict(in_index=torch.tensor([0, 7, 3, 50, 12])), r"`in_index`\[3\] = 50 is out of range"),
    ("negative", dict(in_index=torch.tensor([0, -1, 3, 4, 12])), r"`in_index`\[1\] = -1 is out of range"),
    ("duplicate", dict(in_index=torch.tensor([0, 7, 3, 7, 12])), r"`in_index`\[3\] = 7 repeats `in_index`\[1\]"),
]


@pytest.mark.parametrize("name,bad,match", BAD_META + BAD_VALUES, ids=[c[0] for c in BAD_META + BAD_VALUES])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_input_wrapper(kernel, name, bad, match):
    kw = {**_good(), **bad}
    with use_backend("triton" if kernel == "triton" else "native"), pytest.raises((ValueError, TypeError), match=match):
        _call_wrapper(kw)


@native_only
@pytest.mark.parametrize("name,bad,match", BAD_META + BAD_VALUES, ids=[c[0] for c in BAD_META + BAD_VALUES])
def test_bad_input_direct_op_call(name, bad, match):
    """torch.ops.fasttrack.pruned_linear skips the Python wrapper: the C++ kernel checks itself."""
    kw = {**_good(), **bad}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _call_op(kw)


def test_ln_params_without_normalize_rejected():
    from fasttrack._opchecks import pruned_linear as check_args
    kw = _good()
    with pytest.raises(ValueError, match="`ln_weight` is given but normalize=False"):
        check_args(kw["x"], kw["weight"], kw["bias"], kw["in_index"], kw["ln_weight"],
                                               None, 1e-5, False)


# ---------------------------------------------------------------------------------------------
# PrunedLinear: the packed inference path and the op path (dispatch rule), construction
# ---------------------------------------------------------------------------------------------
@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_module_packed_path(dtype, ln):
    lin = nn.Linear(768, 768).to(dtype)
    norm = nn.LayerNorm(768).to(dtype) if ln else None
    m = PrunedLinear.from_dense(lin, _index(768, 540), norm=norm)
    x = torch.randn(1, 320, 768, dtype=dtype)
    args = (x, m.weight, m.bias, m.in_index, *((norm.weight, norm.bias) if ln else (None, None)), 1e-5, ln)
    with torch.no_grad():
        assert m.uses_packed(x)
        assert_close(m(x), reference.pruned_linear(*args), scale=_tol_scale(dtype, ln))
        lin.bias.add_(1.0)                      # shared bias; weight update re-packs
        m.weight.mul_(0.5)
        args = (x, m.weight, m.bias, m.in_index, *args[4:])
        assert_close(m(x), reference.pruned_linear(*args), scale=_tol_scale(dtype, ln))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["packed", "op-path"])
def test_module_gelu_and_residual_epilogues(dtype, grad):
    """`forward_gelu` / `forward_add` (the oneDNN post-ops on the packed path, plain PyTorch on the
    op path) equal GELU / the residual sum applied to `forward`."""
    lin, norm = nn.Linear(768, 1000).to(dtype), nn.LayerNorm(768).to(dtype)
    m = PrunedLinear.from_dense(lin, _index(768, 540), norm=norm)
    x = torch.randn(2, 37, 768, dtype=dtype)
    residual = torch.randn(2, 37, 1000, dtype=dtype)
    with torch.set_grad_enabled(grad):
        assert m.uses_packed(x) != grad
        plain = m(x)
        assert_close(m.forward_gelu(x, nn.GELU()), F.gelu(plain), scale=2)
        assert_close(m.forward_add(x, residual), residual + plain, scale=2)
        tanh = nn.GELU(approximate="tanh")                    # not the post-op's GELU: applied after
        assert_close(m.forward_gelu(x, tanh), tanh(plain), scale=2)
    if grad:
        m.forward_add(x, residual).sum().backward()
        assert m.weight.grad is not None


@native_only
def test_module_dispatch_rule():
    m = PrunedLinear.from_dense(nn.Linear(50, 33), _index(50, 37))
    x = torch.randn(4, 50)
    assert not m.uses_packed(x)                               # gradient needed -> the op (autograd)
    with torch.no_grad():
        assert m.uses_packed(x)
        assert not m.uses_packed(x.half())                    # fp16: oneDNN cannot pack here
        with use_backend("reference"):
            assert not m.uses_packed(x)                       # backends other than native run the op
    y = m(x)
    y.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    with torch.no_grad():
        assert_close(m(x), y.detach())


def test_module_from_mask_and_errors():
    lin = nn.Linear(50, 33)
    mask = torch.zeros(50)
    mask[[1, 4, 9, 30]] = 1
    m = PrunedLinear.from_mask(lin, mask)
    assert m.in_index.tolist() == [1, 4, 9, 30] and m.weight.shape == (33, 4)
    x = torch.randn(6, 50)
    with torch.no_grad():
        assert_close(m(x), reference.masked_dense_linear(x, lin.weight, lin.bias, mask))
    with pytest.raises(ValueError, match="in_index"):
        PrunedLinear.from_dense(lin, torch.tensor([0, 50]))
    with pytest.raises(ValueError, match="repeated"):
        PrunedLinear.from_dense(lin, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="mask"):
        PrunedLinear.from_mask(lin, torch.ones(49))
    with pytest.raises(TypeError, match="norm"):
        PrunedLinear.from_dense(lin, torch.tensor([0, 1]), norm=nn.LayerNorm(49))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_check_cases_native(dtype):
    """The op's `CheckCase`s (what `python -m fasttrack.check` runs on a GPU machine): tracker
    shapes, forward and the gradients the case names, native kernel vs the reference."""
    from fasttrack.ops.pruned_linear import PRUNED_LINEAR
    for case in PRUNED_LINEAR.cases(torch.device("cpu"), dtype):
        ln = case.args[7]
        upstream = torch.randn(*case.args[0].shape[:-1], case.args[1].shape[0])
        out, got = _grads(lambda *a: _run("native", a), case.args, case.grad, upstream)
        ref_out, want = _grads(reference.pruned_linear, case.args, case.grad, upstream)
        assert_close(out, ref_out, scale=_tol_scale(dtype, ln))
        for g, e in zip(got, want):
            assert_close(g, e, scale=4 * _tol_scale(dtype, ln))


def test_tolerance_table_has_our_dtypes():
    assert all(d in TOL for d in (torch.float32, torch.float16, torch.bfloat16))
