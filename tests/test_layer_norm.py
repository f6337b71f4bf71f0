"""The LayerNorm kernel `fasttrack.ops.layer_norm` (internal op ``_layer_norm``): parity with
`fasttrack.reference.layer_norm` on both CPU paths (vectorised, ATen) at tracker shapes and odd ones,
forward and backward, non-finite rows, opcheck, bad input through the wrapper and a raw torch.ops
call; and the fused modules' rule (`fasttrack.nn.vit.norm_forward`)."""

import pytest
import torch
from torch import nn

from fasttrack import _extension, reference
from fasttrack.nn.vit import norm_forward
from fasttrack.ops import layer_norm
from fasttrack.ops.layer_norm import fast_path_serves
from tolerances import assert_close
from tests import helpers

native_only = pytest.mark.skipif(not _extension.loaded, reason="the native CPU kernel needs fasttrack._C")
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# OSTrack-256 / -384 token matrices, after CE, ViT-S, one token, widths off the 16-lane vectors
# (the masked tail; 64-wide unrolled blocks), 2-D and 4-D inputs, empty
SHAPES = [(1, 320, 768), (1, 720, 768), (2, 244, 768), (1, 153, 768), (1, 320, 384), (3, 1, 768),
          (2, 7, 37), (1, 5, 80), (4, 16), (2, 3, 5, 100), (1, 9, 1), (2, 0, 768)]


def _inputs(shape, dtype, affine=True, seed=0, wdtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype)
    C = shape[-1]
    if not affine:
        return x, None, None
    wd = wdtype or dtype
    return x, (torch.randn(C, generator=g) * 0.5 + 1).to(wd), torch.randn(C, generator=g).to(wd)


@native_only
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    x, w, b = _inputs(shape, dtype)
    with torch.no_grad():
        got = layer_norm(x, w, b, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, reference.layer_norm(x, w, b, 1e-6))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_affine_mixed_affine_strided_and_eps(dtype):
    x, _, _ = _inputs((2, 61, 768), dtype)
    assert_close(layer_norm(x, None, None, 1e-5), reference.layer_norm(x, None, None, 1e-5))
    _, w, b = _inputs((2, 61, 768), dtype, wdtype=torch.float32)       # bf16 tokens, fp32 parameters
    assert_close(layer_norm(x, w, None, 1e-5), reference.layer_norm(x, w, None, 1e-5))
    assert_close(layer_norm(x, None, b, 0.5), reference.layer_norm(x, None, b, 0.5))
    xs = x.transpose(0, 1)
    assert not xs.is_contiguous()
    _, w, b = _inputs((2, 61, 768), dtype)
    assert_close(layer_norm(xs, w, b, 1e-6), reference.layer_norm(xs, w, b, 1e-6))
    const = torch.full((3, 768), 2.5).to(dtype)                           # zero variance: b exactly
    assert_close(layer_norm(const, w, b, 1e-6), b.expand(3, 768).contiguous())


@native_only
def test_vectorised_path_serves_what_it_claims():
    from fasttrack import _C
    for dtype in FLOATS:
        assert fast_path_serves(dtype) == _C.layer_norm_fast_path(dtype)
        if dtype in (torch.float16, torch.float64):
            assert not fast_path_serves(dtype)
    if _C.cpu_isa() == "avx512":
        assert fast_path_serves(torch.float32)


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_non_finite_rows_agree_with_reference(dtype):
    x, w, b = _inputs((1, 6, 100), dtype)
    x[0, 1, 3] = float("nan")
    x[0, 2, 50] = float("inf")
    x[0, 3, 99] = float("-inf")
    got, want = layer_norm(x, w, b, 1e-6), reference.layer_norm(x, w, b, 1e-6)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    assert_close(got[fin], want[fin])


@native_only
def test_backward_matches_reference_autograd():
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = (t.requires_grad_() for t in _inputs((2, 37, 96), dtype))
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
        up = torch.randn(2, 37, 96).to(dtype)
        layer_norm(x, w, b, 1e-6).backward(up)
        reference.layer_norm(xr, wr, br, 1e-6).backward(up)
        for a, r in ((x, xr), (w, wr), (b, br)):
            assert_close(a.grad, r.grad, scale=4)
    x, w, b = (t.requires_grad_() for t in _inputs((3, 7), torch.float64))
    assert torch.autograd.gradcheck(lambda *t: layer_norm(*t, 1e-5), (x, w, b))
    x = _inputs((3, 7), torch.float64)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer_norm(t, None, None, 1e-5), (x,))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.fasttrack._layer_norm.default, (*_inputs((1, 40, 128), dtype), 1e-6))
    torch.library.opcheck(torch.ops.fasttrack._layer_norm.default, (_inputs((3, 33), dtype)[0], None, None, 1e-5))


@native_only
def test_bad_input_is_refused_with_the_argument_named():
    x, w, b = _inputs((1, 8, 16), torch.float32)
    cases = [((x.long(), w, b, 1e-6), TypeError, "`x` must have dtype"),
             ((torch.tensor(1.0), None, None, 1e-6), ValueError, "`x` must have at least 1 dim"),
             ((x, w[:15], b, 1e-6), ValueError, r"`weight` must have shape \[16\]"),
             ((x, w, b.view(4, 4), 1e-6), ValueError, r"`bias` must have shape \[16\]"),
             ((x, w.int(), b, 1e-6), TypeError, "`weight` must have dtype"),
             ((x, w, torch.zeros(16, dtype=torch.bool), 1e-6), TypeError, "`bias` must have dtype")]
    helpers.assert_refused("_layer_norm", layer_norm, cases)
    with pytest.raises(TypeError, match="`eps` must be a real number"):
        layer_norm(x, w, b, "1e-6")


def test_composite_path_under_capped_isa():
    """ATEN_CPU_CAPABILITY=avx2 turns the vectorised path off; ATen's kernel then serves every input
    and matches the spec."""
    if not _extension.loaded or _extension._C.cpu_isa() != "avx512":
        pytest.skip("the cap only changes the path on an AVX-512 machine")
    code = ("import torch\n"
            "from fasttrack import _C, reference\n"
            "from fasttrack.ops.layer_norm import layer_norm, fast_path_serves\n"
            "assert not _C.layer_norm_fast_path(torch.float32) and not fast_path_serves(torch.bfloat16)\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "    x, w, b = torch.randn(1, 153, 768).to(dt), torch.randn(768).to(dt), torch.randn(768).to(dt)\n"
            "    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), reference.layer_norm(x, w, b, 1e-6),\n"
            "                               atol=1.6e-2, rtol=1.6e-2)\n"
            "print('ok')\n")
    helpers.run_capped(code)


# ------------------------------------------------------------------------ the fused modules' rule
@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_norm_forward_runs_the_kernel_where_the_rule_says(dtype, monkeypatch):
    norm = nn.LayerNorm(768, eps=1e-6).to(dtype)
    x = torch.randn(1, 50, 768).to(dtype)
    calls = helpers.count_kernel_calls(monkeypatch, "_layer_norm")
    served = fast_path_serves(dtype)
    with torch.no_grad():
        assert_close(norm_forward(norm, x), norm(x))
    assert len(calls) == int(served)
    norm_forward(norm, x)                                  # grad mode, parameters need grad: torch's
    assert len(calls) == int(served)
    with torch.no_grad():
        norm_forward(nn.LayerNorm((50, 768)).to(dtype), x)  # over two dims: torch's
        norm_forward(type("Sub", (nn.LayerNorm,), {})(768).to(dtype), x)   # a subclass: its own forward
    assert len(calls) == int(served)
