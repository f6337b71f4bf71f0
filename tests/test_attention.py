"""The attention core `fasttrack.ops.attention_core` (internal op ``_attention``): parity with
`fasttrack.reference.attention` on both CPU paths (vectorised, composite) at tracker shapes and odd
ones, forward and backward, non-finite inputs, opcheck, bad input through the wrapper and a raw
torch.ops call; and the fused modules' dispatch rule (`attention_kernel_serves`)."""

import pytest
import torch

from fasttrack import _extension, reference
from fasttrack.nn.vit import Attention, FusedAttention, attention_kernel_serves
from fasttrack.ops import attention_core
from fasttrack.ops.attention import fast_path_serves
from tolerances import assert_close
from tests import helpers

native_only = pytest.mark.skipif(not _extension.loaded, reason="the native CPU kernel needs fasttrack._C")
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# B, N, C, heads: OSTrack-256 / -384 (64 + 256, 144 + 576 tokens), after CE at keep 0.7, ViT-S,
# odd token counts (tails of the 6-row tiles, 16-column blocks and bf16 pairs), other head dims
SHAPES = [(1, 320, 768, 12), (1, 720, 768, 12), (2, 244, 768, 12), (1, 153, 768, 12), (1, 320, 384, 6),
          (3, 1, 768, 12), (1, 7, 128, 2), (2, 17, 64, 1), (1, 33, 96, 3), (1, 50, 240, 3), (2, 0, 768, 12)]


def _qkv(B, N, C, dtype, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(B, N, 3 * C, generator=g).to(dtype)
    return torch.randn(B, N, 6 * C, generator=g).to(dtype)[..., ::2]   # strided view made after the cast


@native_only
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("B,N,C,H", SHAPES, ids=lambda v: str(v))
def test_matches_reference(B, N, C, H, dtype):
    qkv = _qkv(B, N, C, dtype)
    scale = (C // H) ** -0.5
    with torch.no_grad():
        got = attention_core(qkv, H, scale)
    assert got.shape == (B, N, C) and got.dtype == dtype
    assert_close(got, reference.attention(qkv, H, scale))


@native_only
def test_vectorised_path_serves_what_it_claims():
    """float32 with AVX-512, bfloat16 with AVX512_BF16, head dim 64 only; the Python view agrees with
    the C++ one."""
    from fasttrack import _C
    for dtype in FLOATS:
        for d in (32, 64, 80):
            assert fast_path_serves(dtype, d) == _C.attention_fast_path(dtype, d)
            if dtype in (torch.float16, torch.float64) or d != 64:
                assert not _C.attention_fast_path(dtype, d)
    if _C.cpu_isa() == "avx512":
        assert fast_path_serves(torch.float32, 64)


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_scaled_inputs(dtype):
    qkv = _qkv(2, 61, 768, dtype, contiguous=False)
    assert not qkv.is_contiguous()
    for scale in (0.125, 1.0, -0.3, 0.0):
        with torch.no_grad():
            assert_close(attention_core(qkv, 12, scale), reference.attention(qkv, 12, scale))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_non_finite_rows_agree_with_reference(dtype):
    """A NaN query makes its row NaN; a NaN or +inf key makes every row NaN in its head; -inf in a
    key scores -inf (weight 0) or NaN (where q is 0 there): the same elements as the spec."""
    qkv = _qkv(1, 70, 128, dtype)
    qkv[0, 3, 5] = float("nan")          # q, head 0, row 3
    qkv[0, 10, 128 + 64 + 1] = float("inf")   # k, head 1, token 10
    qkv[0, 20, 2 * 128 + 7] = float("-inf")   # v, head 0, token 20
    with torch.no_grad():
        got = attention_core(qkv, 2, 0.125)
    want = reference.attention(qkv, 2, 0.125)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    assert_close(got[fin], want[fin])


@native_only
def test_backward_matches_reference_autograd():
    for dtype in (torch.float32, torch.bfloat16):
        qkv = _qkv(2, 37, 128, dtype).requires_grad_()
        ref = qkv.detach().clone().requires_grad_()
        up = torch.randn(2, 37, 128).to(dtype)
        attention_core(qkv, 2, 0.125).backward(up)
        reference.attention(ref, 2, 0.125).backward(up)
        assert_close(qkv.grad, ref.grad, scale=4)
    x = _qkv(1, 5, 16, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: attention_core(t, 2, 0.7), (x,))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.fasttrack._attention.default, (_qkv(1, 40, 128, dtype), 2, 0.125))


@native_only
def test_bad_input_is_refused_with_the_argument_named():
    qkv = _qkv(1, 8, 128, torch.float32)
    cases = [((qkv[0], 2, 0.1), ValueError, "`qkv` must have 3 dims"),
             ((qkv.long(), 2, 0.1), TypeError, "`qkv` must have dtype"),
             ((qkv, 0, 0.1), ValueError, "`num_heads` must be an int >= 1"),
             ((qkv, -4, 0.1), ValueError, "`num_heads` must be an int >= 1"),
             ((qkv, 3, 0.1), ValueError, r"`qkv.shape\[-1\]` \(384\) must be 3 \* num_heads"),
             ((qkv[..., :383], 1, 0.1), ValueError, r"`qkv.shape\[-1\]` \(383\)"),
             ((qkv, 2 ** 62, 0.1), ValueError, r"`qkv.shape\[-1\]` \(384\) must be 3 \* num_heads \* head_dim with "
                                               r"num_heads=4611686018427387904")]
    helpers.assert_refused("_attention", attention_core, cases)


def test_composite_path_under_capped_isa():
    """ATEN_CPU_CAPABILITY=avx2 turns the vectorised path off (the kernel follows ATen's cap); the
    composite path then serves every input and still matches the spec."""
    if not _extension.loaded or _extension._C.cpu_isa() != "avx512":
        pytest.skip("the cap only changes the path on an AVX-512 machine")
    code = ("import torch\n"
            "from fasttrack import _C, reference\n"
            "from fasttrack.ops.attention import attention_core, fast_path_serves\n"
            "assert not _C.attention_fast_path(torch.float32, 64) and not fast_path_serves(torch.bfloat16, 64)\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "    qkv = torch.randn(1, 153, 3 * 768).to(dt)\n"
            "    with torch.no_grad():\n"
            "        torch.testing.assert_close(attention_core(qkv, 12, 0.125), reference.attention(qkv, 12, 0.125),\n"
            "                                   atol=1.6e-2, rtol=1.6e-2)\n"
            "print('ok')\n")
    helpers.run_capped(code)


# ------------------------------------------------------------------------ the fused modules' rule
def _modules(dtype, dim=768, heads=12):
    torch.manual_seed(0)
    ref = Attention(dim, heads, qkv_bias=True).eval().to(dtype)
    return ref, FusedAttention.from_reference(ref)


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_attention_runs_the_kernel_where_the_rule_says(dtype, monkeypatch):
    ref, fused = _modules(dtype)
    x = torch.randn(1, 320, 768).to(dtype)
    calls = helpers.count_kernel_calls(monkeypatch, "_attention")
    served = fast_path_serves(dtype, 64)
    with torch.no_grad():
        qkv = fused.qkv(x)
        assert attention_kernel_serves(qkv, 12) == served
        out = fused(x)
        assert len(calls) == int(served)
        out_qk, q, k, amap = fused.forward_qk(x)
        assert len(calls) == 2 * int(served) and (amap is None or not served)
        assert_close(out, ref(x))
        assert_close(out_qk, out)
        # not served: a key mask, the map asked for, or a gradient needed
        mask = torch.zeros(1, 320, dtype=torch.bool)
        mask[0, -5:] = True
        assert not attention_kernel_serves(qkv, 12, mask)
        fused(x, mask)
        fused(x, None, True)
        assert not attention_kernel_serves(qkv, 12, None, dropout_p=0.1)
        assert not attention_kernel_serves(qkv.to("meta"), 12)
    assert len(calls) == 2 * int(served)
    x.requires_grad_()
    y = fused(x)
    assert len(calls) == 2 * int(served)
    y.float().sum().backward()
    assert x.grad is not None


@native_only
def test_fused_attention_q_k_views_are_the_heads():
    """forward_qk hands CE scoring q and k as views of the qkv output: the same values as the
    reference split."""
    ref, fused = _modules(torch.float32, dim=128, heads=2)
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        _, q, k, _ = fused.forward_qk(x)
        qkv = ref.qkv(x).reshape(2, 9, 3, 2, 64).permute(2, 0, 3, 1, 4)
    assert torch.equal(q, qkv[0]) and torch.equal(k, qkv[1])
