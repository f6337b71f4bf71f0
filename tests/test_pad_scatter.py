"""gather_tokens / pad_scatter (issue 4): native kernels vs `fasttrack.reference` and the official
OSTrack recipe (`reference.official_pad_scatter`), autograd, opcheck, torch.compile, bad input.

Both ops only move data, so parity is exact (bitwise), stricter than tests/tolerances.py; the official
recipe promotes fp16/bf16 to fp32, so it is compared after casting ours to fp32 (exact too: the
promotion is lossless). On CPU the native kernel is C++; the CUDA kernel runs these tests unchanged
on a machine with a GPU (the `device` fixture)."""
import pytest
import torch

import fasttrack
from fasttrack import _extension, reference
from fasttrack.ops._registry import REGISTRY
from fasttrack.ops.pad_scatter import SHAPES, random_index

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="needs the native extension fasttrack._C")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _extension.cuda_built() else [])
SHAPE_IDS = [s[0] for s in SHAPES]
BY_NAME = {s[0]: s[1:] for s in SHAPES}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _problem(name, B, dtype, device, layout):
    _, L, k, C, hw = BY_NAME[name]
    index = random_index(B, L, k, device)
    kept = torch.randn(B, k, C, device=device).to(dtype)
    return kept, index, L, (list(hw) if layout == "nchw" else [])


def _complement(index, L):
    """Removed positions per row (what OSTrack concatenates after the kept indices), shuffled."""
    B = index.shape[0]
    keep = torch.zeros(B, L, dtype=torch.bool, device=index.device).scatter_(1, index, True)
    rest = torch.stack([torch.nonzero(~keep[b]).squeeze(1) for b in range(B)])
    return rest.gather(1, torch.argsort(torch.rand(rest.shape, device=rest.device), dim=1))


def _to_nchw(tokens, hw):
    B, L, C = tokens.shape
    return tokens.transpose(1, 2).reshape(B, C, *hw)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("layout", ["tokens", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("name", SHAPE_IDS)
def test_pad_scatter_matches_reference_and_official(name, B, dtype, layout, device):
    kept, index, L, hw = _problem(name, B, dtype, device, layout)
    out = fasttrack.pad_scatter(kept, index, L, layout, hw)
    expected = reference.pad_scatter(kept, index, L, layout, hw)
    assert out.dtype == kept.dtype and out.shape == expected.shape
    assert torch.equal(out, expected)

    official = reference.official_pad_scatter(kept, index, _complement(index, L))
    if layout == "nchw":
        official = _to_nchw(official, hw)
    assert torch.equal(out.float(), official.float())
    # removed positions are exact zeros, not just close
    if layout == "tokens":
        filled = torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, index, True)
        assert (out[~filled] == 0).all() and not torch.signbit(out[~filled]).any()


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("name", SHAPE_IDS)
def test_gather_tokens_matches_reference(name, B, dtype, layout, device):
    _, L, k, C, hw = BY_NAME[name]
    x = torch.randn(*((B, L, C) if layout == "tokens" else (B, C, *hw)), device=device).to(dtype)
    index = random_index(B, L, k, device)
    out = fasttrack.gather_tokens(x, index, layout)
    assert out.dtype == x.dtype
    assert torch.equal(out, reference.gather_tokens(x, index, layout))


@pytest.mark.parametrize("B", [1, 8], ids=["cached", "streamed"])
@pytest.mark.parametrize("hw", [(16, 16), (24, 24)], ids=["pow2-planes", "other-planes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nchw_maps_with_channel_tails(hw, dtype, B, device):
    """C not a multiple of 8 or of the 128-channel task block, below and above the CPU kernels'
    streaming threshold (4 MB): the scatter's channel-strip order (power-of-two planes) and
    position-tile order (other planes), each with its scalar channel tail; and the gather back."""
    L, k, C = hw[0] * hw[1], 89, 1030
    kept, index = torch.randn(B, k, C, device=device).to(dtype), random_index(B, L, k, device)
    out = fasttrack.pad_scatter(kept, index, L, "nchw", list(hw))
    assert (out.nbytes > 4 << 20) == (B == 8)
    assert torch.equal(out, reference.pad_scatter(kept, index, L, "nchw", list(hw)))
    assert torch.equal(fasttrack.gather_tokens(out, index, "nchw"), kept)


@pytest.mark.parametrize("B", [1, 24], ids=["cached", "uncached"])
@pytest.mark.parametrize("k", [20, 32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nchw_gather_either_side_of_the_group_rule(dtype, k, B, device):
    """The CPU gather from planes of 2- or 4-byte elements reads groups of G = 16 / elem positions
    (AVX-512) when G·k >= N and assembles the kept lines otherwise (csrc/cpu/gather_planes_kernel.cpp,
    use_position_groups): at N = 256, k = 20 below the rule for both dtypes, k = 32 below it for fp32
    and on it for bf16, k = 64 on it for fp32, k = N (every group full); a cached map and a larger one
    (fp32: 19 MB, read with prefetches, output streamed from k = 60 up)."""
    L, C, hw = 256, 768, (16, 16)
    x, index = torch.randn(B, C, *hw, device=device).to(dtype), random_index(B, L, k, device)
    assert torch.equal(fasttrack.gather_tokens(x, index, "nchw"), reference.gather_tokens(x, index, "nchw"))


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_gather_inverts_pad_scatter(layout, device):
    kept, index, L, hw = _problem("ostrack256", 3, torch.float32, device, layout)
    assert torch.equal(fasttrack.gather_tokens(fasttrack.pad_scatter(kept, index, L, layout, hw), index, layout), kept)


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_edge_counts(layout, device):
    """k = 0 (all zeros) and k = L (a permutation, nothing removed)."""
    L, C, hw = 12, 8, ([3, 4] if layout == "nchw" else [])
    kept = torch.randn(2, 0, C, device=device)
    index = torch.empty(2, 0, dtype=torch.long, device=device)
    out = fasttrack.pad_scatter(kept, index, L, layout, hw)
    assert torch.equal(out, reference.pad_scatter(kept, index, L, layout, hw)) and not out.any()
    kept = torch.randn(2, L, C, device=device)
    index = random_index(2, L, L, device)
    assert torch.equal(fasttrack.pad_scatter(kept, index, L, layout, hw), reference.pad_scatter(kept, index, L, layout, hw))


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_non_contiguous_inputs(layout, device):
    _, L, k, C, hw = BY_NAME["ostrack256"]
    hw = list(hw)
    B, lens_t = 2, 64
    # the tracker's kept search tokens: a slice of [B, 64 + k, C] (row stride != C)
    x = torch.randn(B, lens_t + k, C, device=device)
    kept = x[:, lens_t:]
    # channel stride != 1, and an index that is a strided view
    kept_t = torch.randn(B, C, k, device=device).transpose(1, 2)
    index = random_index(B, L, 2 * k, device)[:, ::2]
    assert not kept.is_contiguous() and not kept_t.is_contiguous() and not index.is_contiguous()
    hw_arg = hw if layout == "nchw" else []
    for src in (kept, kept_t):
        out = fasttrack.pad_scatter(src, index, L, layout, hw_arg)
        assert torch.equal(out, reference.pad_scatter(src.contiguous(), index.contiguous(), L, layout, hw_arg))
    # gather from non-contiguous maps. The CPU kernel reads channel-contiguous maps as rows and
    # token-contiguous maps as planes, and copies any other layout once: cover all three.
    H, W = hw
    if layout == "nchw":
        fmaps = {
            "rows (channels_last)": torch.randn(B, C, H, W, device=device).to(memory_format=torch.channels_last),
            "planes (batch-strided)": torch.randn(2 * B, C, H, W, device=device)[::2],
            "copy (W sliced)": torch.randn(B, C, H, W + 3, device=device)[..., :W],
        }
    else:
        fmaps = {
            "rows (token-strided)": torch.randn(B, 2 * L, C, device=device)[:, ::2],
            "planes (transposed)": torch.randn(B, C, L, device=device).transpose(1, 2),
            "copy (both strided)": torch.randn(B, 2 * C, 2 * L, device=device).transpose(1, 2)[:, ::2, ::2],
        }
    for what, fmap in fmaps.items():
        assert not fmap.is_contiguous(), what
        out = fasttrack.gather_tokens(fmap, index, layout)
        assert torch.equal(out, reference.gather_tokens(fmap.contiguous(), index, layout)), what


# -------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("layout", ["tokens", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ostrack256", "odd"])
def test_backward_matches_reference(name, dtype, layout, device):
    kept, index, L, hw = _problem(name, 2, dtype, device, layout)
    ours = kept.clone().requires_grad_()
    ref = kept.clone().requires_grad_()
    out, out_ref = fasttrack.pad_scatter(ours, index, L, layout, hw), reference.pad_scatter(ref, index, L, layout, hw)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert torch.equal(ours.grad, ref.grad)

    x = torch.randn_like(out_ref).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g, g_ref = fasttrack.gather_tokens(x, index, layout), reference.gather_tokens(x_ref, index, layout)
    grad = torch.randn_like(g)
    g.backward(grad)
    g_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("layout", ["tokens", "nchw"])
def test_gradcheck_float64(layout, device):
    L, k, C = 12, 5, 3
    hw = [3, 4] if layout == "nchw" else []
    index = random_index(2, L, k, device)
    kept = torch.randn(2, k, C, device=device, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*((2, L, C) if layout == "tokens" else (2, C, 3, 4)), device=device, dtype=torch.float64,
                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fasttrack.pad_scatter(t, index, L, layout, hw), (kept,))
    assert torch.autograd.gradgradcheck(lambda t: fasttrack.pad_scatter(t, index, L, layout, hw), (kept,))
    assert torch.autograd.gradcheck(lambda t: fasttrack.gather_tokens(t, index, layout), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fasttrack.gather_tokens(t, index, layout), (x,))


# ----------------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("op", ["gather_tokens", "pad_scatter"])
def test_opcheck(op, device):
    """Every registered CheckCase (tracker shapes, both layouts), all of opcheck's default tests."""
    cases = REGISTRY[op].cases(device, torch.float32)
    assert len(cases) == 2 * len(SHAPES)
    for case in cases:
        args = tuple(a.requires_grad_() if i in case.grad else a for i, a in enumerate(case.args))
        torch.library.opcheck(REGISTRY[op].packet.default, args)


def test_torch_compile_fullgraph(device):
    _, L, k, C, hw = BY_NAME["ostrack256"]
    index = random_index(2, L, k, device)

    def head(kept):
        fmap = fasttrack.pad_scatter(kept, index, L, "nchw", hw)
        tokens = fasttrack.pad_scatter(kept * 2, index, L)
        return (fasttrack.gather_tokens(fmap, index, "nchw") + fasttrack.gather_tokens(tokens, index)).sum() \
            + fmap.square().sum()

    kept = torch.randn(2, k, C, device=device, requires_grad=True)
    kept_ref = kept.detach().clone().requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(head, fullgraph=True)(kept)
    out.backward()
    with fasttrack.use_backend("reference"):
        out_ref = head(kept_ref)
    out_ref.backward()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(kept.grad, kept_ref.grad)


# ------------------------------------------------------------------------------------------ bad input
def _calls(kept, x, index, L, hw):
    """Each op through the public wrapper and straight through the dispatcher (no Python checks)."""
    return {
        "pad_scatter": lambda: fasttrack.pad_scatter(kept, index, L, "nchw", hw),
        "pad_scatter/torch.ops": lambda: torch.ops.fasttrack.pad_scatter(kept, index, L, "nchw", hw),
        "gather_tokens": lambda: fasttrack.gather_tokens(x, index, "nchw"),
        "gather_tokens/torch.ops": lambda: torch.ops.fasttrack.gather_tokens(x, index, "nchw"),
    }


@pytest.mark.parametrize("bad", ["too_large", "negative", "duplicate"])
def test_bad_index_values_raise_and_touch_nothing(bad, device):
    L, k, C, hw = 20, 6, 8, [4, 5]
    kept = torch.randn(2, k, C, device=device)
    x = torch.randn(2, C, *hw, device=device)
    index = random_index(2, L, k, device)
    # the bad entry sits in the last row, after valid ones: a kernel that wrote as it validated
    # would already have written row 0
    index[1, 3] = {"too_large": L, "negative": -1, "duplicate": index[1, 0].item()}[bad]
    snapshot = [t.clone() for t in (kept, x, index)]
    pattern = r"`index`\[1, 3\] = -?\d+ (is out of range \[0, 20\)|repeats `index`\[1, 0\])"
    for name, call in _calls(kept, x, index, L, hw).items():
        with pytest.raises(ValueError, match=pattern if device == "cpu" else "`index`"):
            call()
    for before, after in zip(snapshot, (kept, x, index)):
        assert torch.equal(before, after)


def test_bad_metadata_raises(device):
    L, k, C = 20, 6, 8
    kept = torch.randn(2, k, C, device=device)
    x = torch.randn(2, C, 4, 5, device=device)
    index = random_index(2, L, k, device)
    for call in _calls(kept, x, index.int(), L, [4, 5]).values():
        with pytest.raises(TypeError, match=r"`index` must have dtype.*int64"):
            call()
    for hw in ([4, 4], [20], [2, 5, 2]):
        for op in (fasttrack.pad_scatter, torch.ops.fasttrack.pad_scatter):
            with pytest.raises(ValueError, match=r"`hw` must be \(H, W\) with H\*W == length=20"):
                op(kept, index, L, "nchw", hw)
    # k > L: more kept tokens than positions / than tokens to gather from
    for op in (fasttrack.pad_scatter, torch.ops.fasttrack.pad_scatter):
        with pytest.raises(ValueError, match="`length` must be .*>= k=6"):
            op(kept, index, 5)
    too_many = torch.arange(6, device=device).expand(2, 6).contiguous()
    for op in (fasttrack.gather_tokens, torch.ops.fasttrack.gather_tokens):
        with pytest.raises(ValueError, match="`index` selects 6 tokens but `x` has only 4"):
            op(torch.randn(2, 4, C, device=device), too_many)
        with pytest.raises(ValueError, match="`layout` must be one of"):
            op(x, index, "nhwc")
    for op in (fasttrack.pad_scatter, torch.ops.fasttrack.pad_scatter):
        with pytest.raises(ValueError, match=r"`index` must have shape \[2, 6\]"):
            op(kept, index[:, :5], L)
        with pytest.raises(TypeError, match="`kept` must have dtype in"):
            op(kept.int(), index, L)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and a CUDA build of fasttrack._C")
def test_cuda_check_index_false_never_writes_through_bad_index():
    """The documented opt-out: no error raised, but bad entries still never reach memory."""
    L, k, C = 20, 6, 8
    kept = torch.randn(2, k, C, device="cuda")
    index = random_index(2, L, k, "cuda")
    index[1, 3] = 1 << 40
    out = fasttrack.pad_scatter(kept, index, L, check_index=False)
    good = torch.ones(k, dtype=torch.bool)
    good[3] = False
    assert torch.equal(out[1, index[1, good]], kept[1, good])
    gathered = fasttrack.gather_tokens(out, index, check_index=False)
    assert not gathered[1, 3].any()
