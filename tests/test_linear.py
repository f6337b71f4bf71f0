"""`fasttrack.nn.FastLinear`: parity with nn.Linear on both dispatch paths, the dispatch rule,
re-packing when the weight changes, autograd, state-dict compatibility and torch.compile."""
import copy

import pytest
import torch
from torch import nn

from fasttrack.nn.linear import FastLinear
from tolerances import assert_close

# ViT-B linears at OSTrack-256 (64 + 256 tokens), and odd sizes
SHAPES = [((1, 320, 768), 2304), ((1, 320, 3072), 768), ((2, 7, 50), 33), ((5, 192), 1)]


def _pair(d_in, d_out, bias=True, dtype=torch.float32):
    ref = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    return ref, FastLinear.from_linear(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_parity_inference(shape, d_out, dtype, bias):
    ref, fast = _pair(shape[-1], d_out, bias, dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert fast.uses_packed(x)
        # K up to 3072: a different summation order than the reference GEMM
        assert_close(fast(x), ref(x), scale=4 if dtype == torch.float32 else 1)


def test_non_contiguous_input():
    ref, fast = _pair(50, 33)
    x = torch.randn(3, 50, 9).transpose(1, 2)
    with torch.no_grad():
        assert_close(fast(x), ref(x))


def test_dispatch_rule():
    """Packed only for CPU fp32/bf16 inference; F.linear with grad, for fp16/fp64, mixed dtypes."""
    fast = FastLinear(16, 8)
    x = torch.randn(4, 16)
    assert not fast.uses_packed(x)                    # grad mode on and weight requires grad
    with torch.no_grad():
        assert fast.uses_packed(x)
        assert not fast.uses_packed(x.double())       # dtype mismatch with the weight
    fast.requires_grad_(False)
    assert fast.uses_packed(x)                        # frozen module, no grad needed
    assert not fast.uses_packed(x.requires_grad_())   # gradient w.r.t. x needed
    for dtype in (torch.float16, torch.float64):
        m = FastLinear(16, 8, dtype=dtype)
        xd = torch.randn(4, 16, dtype=dtype)
        with torch.no_grad():
            assert not m.uses_packed(xd)
            torch.testing.assert_close(m(xd), nn.functional.linear(xd, m.weight, m.bias), atol=0, rtol=0)


def test_fallback_path_is_f_linear():
    ref, fast = _pair(24, 12)
    x = torch.randn(3, 24)
    assert not fast.uses_packed(x)
    torch.testing.assert_close(fast(x), ref(x), atol=0, rtol=0)


def test_repack_after_inplace_update():
    ref, fast = _pair(32, 16)
    x = torch.randn(5, 32)
    with torch.no_grad():
        y0 = fast(x)
        ref.weight.mul_(-2.0)                         # shared Parameter, same storage
        y1 = fast(x)
    assert_close(y1, ref(x).detach())
    assert not torch.allclose(y0, y1)


def test_repack_after_load_state_dict_and_to():
    fast = FastLinear(32, 16)
    x = torch.randn(5, 32)
    other = nn.Linear(32, 16)
    with torch.no_grad():
        fast(x)
        fast.load_state_dict(other.state_dict())
        assert_close(fast(x), other(x))
        fast.to(torch.bfloat16)                       # new storage
        xb = x.bfloat16()
        assert_close(fast(xb), other.to(torch.bfloat16)(xb))
        fast.weight = nn.Parameter(torch.zeros(16, 32, dtype=torch.bfloat16))  # new Parameter
        assert_close(fast(xb), fast.bias.expand(5, 16))


def test_autograd_matches_linear():
    ref, fast = _pair(40, 24)
    x = torch.randn(6, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(6, 24)
    fast(x).backward(g)
    gw, gb = fast.weight.grad.clone(), fast.bias.grad.clone()
    ref.zero_grad()
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(gw, ref.weight.grad)
    torch.testing.assert_close(gb, ref.bias.grad)


def test_state_dict_and_constructor_compat():
    torch.manual_seed(1)
    ref = nn.Linear(20, 10, bias=False)
    torch.manual_seed(1)
    fast = FastLinear(20, 10, bias=False)
    assert list(fast.state_dict()) == list(ref.state_dict()) == ["weight"]
    torch.testing.assert_close(fast.weight, ref.weight)          # same init as nn.Linear
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert isinstance(fast, nn.Linear)
    shared = FastLinear.from_linear(ref)
    assert shared.weight is ref.weight and shared.bias is None
    with pytest.raises(TypeError, match="`linear`"):
        FastLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_deepcopy_after_packing():
    fast = FastLinear(8, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        fast(x)
        twin = copy.deepcopy(fast)
        assert_close(twin(x), fast(x))


@pytest.mark.parametrize("freezing", [False, True])
def test_torch_compile(freezing):
    ref, fast = _pair(64, 48)
    x = torch.randn(2, 10, 64)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing):
        out = torch.compile(fast, fullgraph=True)(x)
        assert_close(out, ref(x))
