"""fasttrack's panel GEMM (csrc/include/fasttrack/panel_linear.h; `fasttrack._C.cpu.panel_linear`):
the packed CPU GEMM of `FastLinear` / `PrunedLinear` / the native ViT block where its rule holds.

- the rule (`panel_serves`, the C++ one) and which packed form `PackedWeight` builds;
- parity with ``F.linear`` (+ exact GELU / + residual) in float64 on ViT-B shapes and odd ones (row
  tails, K chunk tails, row blocks, one panel), float32 / bfloat16, 1 and 2 threads (bit-identical);
- raw calls with bad arguments raise, naming the argument;
- the ISA caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and a disabled oneDNN turn it off;
- a fuzz over sizes, dtypes, epilogues and wrong arguments (also run under ASan: make asan-test).
Not reachable here: AMX CPUs and AVX-512 CPUs without AVX512_BF16 (the rule's AMX and bf16 clauses
are only read, through `panel_linear_serves`, on the CPU the suite runs on).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttrack import _extension
from fasttrack.nn import linear as linear_mod
from fasttrack.nn.derived import refresh
from fasttrack.nn.linear import FastLinear, PackedWeight, panel_serves
from tests import helpers
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(linear_mod._PANEL is None, reason="needs the native extension fasttrack._C")

DTYPES = [torch.float32, torch.bfloat16]


def _served(dtype) -> bool:
    return _extension.loaded and _extension._C.cpu.panel_linear_serves(dtype, 768, 768)


def _needs(dtype):
    if not _served(dtype):
        pytest.skip(f"the panel GEMM does not serve {dtype} on this CPU ({_extension._C.cpu_isa()})")


def _case(M, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    r = torch.randn(M, N, generator=g).to(dtype)
    return x, w, b, r


def _expected(x, w, b, epilogue, r):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if epilogue == "gelu":
        y = F.gelu(y)
    elif epilogue == "add":
        y = y + r.double()
    return y


def _panel(x, packed, b, epilogue, r):
    return linear_mod._PANEL.panel_linear(x, packed, b, epilogue == "gelu", r if epilogue == "add" else None)


def test_rule_states_dtype_shape_and_onednn_switch():
    C = _extension._C.cpu
    fp32, bf16 = _served(torch.float32), _served(torch.bfloat16)
    assert C.panel_linear_serves(torch.float32, 77, 128) == fp32         # any K for fp32
    assert C.panel_linear_serves(torch.bfloat16, 77, 128) is False       # bf16 pairs K
    assert C.panel_linear_serves(torch.bfloat16, 78, 128) == bf16
    assert C.panel_linear_serves(torch.float32, 768, 100) is False       # N not a multiple of 64
    assert C.panel_linear_serves(torch.float32, 0, 64) is False
    assert C.panel_linear_serves(torch.float16, 768, 768) is False
    assert C.panel_linear_serves(torch.float64, 768, 768) is False
    with torch.backends.mkldnn.flags(enabled=False):
        assert C.panel_linear_serves(torch.float32, 768, 768) is False
    if _extension._C.cpu_isa() != "avx512":
        assert not fp32 and not bf16


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_packed_weight_form_follows_the_rule(dtype):
    if dtype not in linear_mod._PACKED_DTYPES:
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU: no packed form at all")
    w = torch.randn(192, 64).to(dtype)
    pw = PackedWeight()
    packed = pw.get(w)
    assert (not packed.is_mkldnn) == panel_serves(w)
    if not packed.is_mkldnn:
        assert packed.shape == (3, 64, 64) and packed.dtype == dtype
    with torch.backends.mkldnn.flags(enabled=False):
        assert not panel_serves(w) and pw.get(w).is_mkldnn                # the other form, its own cache
    assert pw.get(w) is packed                                          # the first form still cached
    odd = torch.randn(100, 64).to(dtype)
    assert not panel_serves(odd) and PackedWeight().get(odd).is_mkldnn


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
@pytest.mark.parametrize("M,K,N,bias", [
    (320, 768, 2304, True),    # OSTrack-256 qkv
    (320, 3072, 768, True),    # fc2: 4 K chunks
    (720, 768, 768, True),     # OSTrack-384 tokens: two row blocks, a 80-row tail chunk
    (1, 768, 64, False),       # one row, one panel, no bias
    (131, 1000, 192, True),    # K chunk tail (768 + 232), row tail
    (37, 2, 128, True),        # K = 2
])
def test_matches_reference(M, K, N, bias, epilogue, dtype):
    _needs(dtype)
    x, w, b, r = _case(M, K, N, dtype, bias)
    packed = linear_mod._PANEL.panel_pack(w)
    y = _panel(x, packed, b, epilogue, r)
    assert y.shape == (M, N) and y.dtype == dtype
    # fp32: K-long fp32 sums; bf16: one rounding of the output (the inputs are exact in fp32)
    assert_close(y.double(), _expected(x, w, b, epilogue, r), dtype=dtype, scale=max(1.0, K / 256))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_leading_dims_threads_and_non_finite(dtype):
    _needs(dtype)
    x, w, b, r = _case(2 * 161, 384, 256, dtype)
    packed = linear_mod._PANEL.panel_pack(w)
    x3, r3 = x.view(2, 161, 384), r.view(2, 161, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _panel(x3, packed, b, "add", r3)
        torch.set_num_threads(2)
        two = _panel(x3, packed, b, "add", r3)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (2, 161, 256)
    assert torch.equal(one, two)                                        # each output tile has one owner
    assert_close(one.view(-1, 256).double(), _expected(x, w, b, "add", r), dtype=dtype, scale=1.5)
    bad = x.clone()
    bad[5, 7] = float("nan")
    bad[9, 0] = float("inf")
    y = _panel(bad, packed, b, "gelu", None)
    assert torch.isnan(y[5]).all() and not torch.isfinite(y[9]).any()
    assert torch.isfinite(y[[0, 1, 2, 3, 4, 6, 7, 8]]).all()
    empty = _panel(x[:0], packed, b, "none", None)
    assert empty.shape == (0, 256)
    strided_bias = torch.stack([b, b], 1)[:, 0]                         # any strides, as oneDNN takes
    assert not strided_bias.is_contiguous()
    assert torch.equal(_panel(x, packed, strided_bias, "none", None), _panel(x, packed, b, "none", None))


def test_gelu_epilogue_is_exact_gelu():
    """The erf approximation (A&S 7.1.26) against float64 erf over the range that matters."""
    _needs(torch.float32)
    t = torch.linspace(-12, 12, 64 * 96).view(96, 64)
    packed = linear_mod._PANEL.panel_pack(torch.eye(64))
    y = _panel(t, packed, None, "gelu", None).double()
    assert (y - F.gelu(t.double())).abs().max().item() < 3e-7 * 12
    # non-finite pre-activations, through the bias (a non-finite x would spread over its whole row)
    b = torch.linspace(-3, 3, 64)
    b[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    y = _panel(torch.zeros(1, 64), packed, b, "gelu", None)[0].double()
    ref = F.gelu(b.double())
    assert torch.equal(y.isfinite(), ref.isfinite()) and not y[:3].isfinite().any()   # non-finite where GELU is
    assert (y[3:] - ref[3:]).abs().max().item() < 3e-7 * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fast_linear_repacks_when_the_weight_changes(dtype):
    _needs(dtype)
    m = FastLinear(128, 192).to(dtype).requires_grad_(False)
    x = torch.randn(5, 128).to(dtype)
    assert panel_serves(m.weight) and m.uses_packed(x)
    before = m(x)
    m.weight.data.mul_(2)                                               # in place through .data
    after = m(x)
    assert_close(after.double(), F.linear(x.double(), m.weight.double(), m.bias.double()), dtype=dtype, scale=2)
    assert not torch.equal(before, after)
    xt = torch.randn(128, 5).to(dtype).t()                              # a non-contiguous x
    assert_close(m(xt).double(), F.linear(xt.double(), m.weight.double(), m.bias.double()), dtype=dtype, scale=2)
    assert m._packed._panel.value is not None
    assert refresh(m) >= 1 and m._packed._panel.value is None           # refresh clears the panel form too


def test_raw_calls_refuse_bad_input():
    _needs(torch.float32)
    P = linear_mod._PANEL
    x, w, b, r = _case(10, 128, 128, torch.float32)
    packed = P.panel_pack(w)
    cases = [
        ((x.t(), packed, b, False, None), "`x` must be a contiguous"),
        ((x.double(), packed, b, False, None), "`packed` must have x's dtype"),
        ((x[:, :64].contiguous(), packed, b, False, None), "`x`'s last dim must be the weight's in_features 128"),
        ((x, w, b, False, None), "`packed` must be a weight packed by"),
        ((x, packed[:, :, :32].contiguous(), b, False, None), "`packed` must be a weight packed by"),
        ((x, packed, b[:64], False, None), r"`bias` must be a \[128\] CPU tensor"),
        ((x, packed, b.double(), False, None), r"`bias` must be a \[128\] CPU tensor of x's dtype Float"),
        ((x, packed, b, False, r[:5]), "`residual` must be a contiguous CPU tensor of x's dtype Float and shape"),
        ((x, packed, b, False, r.t()), "`residual` must be a contiguous"),
        ((x, packed, b, True, r), "`gelu` and `residual` are two epilogues"),
        ((x.half(), packed.half(), b.half(), False, None), "this path does not serve a Half weight"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            P.panel_linear(*args)
    for bad, msg in ((w[0], "`weight` must be a 2-D strided CPU tensor"),
                     (w[:100], "does not serve a Float weight of 100 x 128"),
                     (w.half(), "does not serve a Half weight")):
        with pytest.raises(ValueError, match=msg):
            P.panel_pack(bad)
    if _served(torch.bfloat16):
        with pytest.raises(ValueError, match="does not serve a BFloat16 weight of 128 x 127"):
            P.panel_pack(torch.randn(128, 127).bfloat16())


@pytest.mark.skipif(not _extension.loaded or _extension._C.cpu_isa() != "avx512",
                    reason="the caps only matter where the panel GEMM runs")
@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}],
                         ids=["aten-avx2", "onednn-avx2"])
def test_isa_caps_turn_the_panel_gemm_off(env):
    code = ("import torch\n"
            "from fasttrack.nn.linear import FastLinear, PackedWeight, panel_serves\n"
            "w = torch.randn(768, 768)\n"
            "assert not panel_serves(w) and not panel_serves(w.bfloat16())\n"
            "m = FastLinear(768, 768).requires_grad_(False)\n"
            "x = torch.randn(3, 768)\n"
            "assert m._packed.get(m.weight).is_mkldnn\n"
            "torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-4, rtol=1e-4)\n"
            "print('ok')\n")
    helpers.run_isolated(code, env)


@settings(max_examples=int(os.environ.get("FASTTRACK_PANEL_FUZZ", "40")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_raw_calls(data):
    """Random sizes around the blocking boundaries, with one argument made wrong at times: a served
    call matches the float64 product, a wrong one raises ValueError; nothing else happens."""
    dtype = data.draw(st.sampled_from(DTYPES))
    _needs(dtype)
    P = linear_mod._PANEL
    M = data.draw(st.sampled_from([0, 1, 5, 127, 128, 129, 513]))
    K = data.draw(st.sampled_from([2, 6, 64, 766, 768, 770, 1538]))
    N = 64 * data.draw(st.integers(1, 4))
    epilogue = data.draw(st.sampled_from(["none", "gelu", "add"]))
    x, w, b, r = _case(M, K, N, dtype, data.draw(st.booleans()), seed=data.draw(st.integers(0, 2 ** 16)))
    packed = P.panel_pack(w)
    wrong = data.draw(st.sampled_from([None, None, "x-width", "x-strided", "bias-size", "residual-shape",
                                       "packed-dtype", "x-3d"]))
    args = [x, packed, b, epilogue == "gelu", r if epilogue == "add" else None]
    if wrong == "x-width":
        args[0] = torch.randn(M, K + 2).to(dtype)
    elif wrong == "x-strided" and M > 1:
        args[0] = torch.randn(K, M).to(dtype).t()
    elif wrong == "bias-size":
        args[2] = torch.randn(N + 64).to(dtype)
    elif wrong == "residual-shape" and epilogue == "add":
        args[4] = torch.randn(M + 1, N).to(dtype)
    elif wrong == "packed-dtype":
        args[1] = packed.double()
    elif wrong == "x-3d" and M:
        args[0] = x.view(1, M, K)
        if epilogue == "add":
            args[4] = r.view(1, M, N)
        wrong = None                                   # leading dims are fine
    else:
        wrong = None
    if wrong is not None:
        with pytest.raises(ValueError, match="fasttrack.panel_linear"):
            P.panel_linear(*args)
        return
    y = P.panel_linear(*args)
    assert y.shape == (*args[0].shape[:-1], N) and y.dtype == dtype
    assert_close(y.reshape(M, N).double(), _expected(x, w, b, epilogue, r), dtype=dtype, scale=max(1.0, K / 256))


@pytest.mark.skipif(not _extension.loaded or _extension._C.cpu_isa() != "avx512",
                    reason="the rule's static part only matters where the panel GEMM can run")
def test_rule_asked_first_with_onednn_off_is_not_kept():
    """ATen's brgemm refuses bf16 while oneDNN is off, so the rule's probe fails then: a process whose
    first question comes with oneDNN off must still get the panel GEMM once oneDNN is on again."""
    code = ("import torch\n"
            "import fasttrack._C as C\n"
            "with torch.backends.mkldnn.flags(enabled=False):\n"
            "    assert not C.cpu.panel_linear_serves(torch.float32, 768, 768)\n"
            f"assert C.cpu.panel_linear_serves(torch.float32, 768, 768) is {_served(torch.float32)}\n"
            "print('ok')\n")
    helpers.run_isolated(code)
