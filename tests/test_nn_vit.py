"""fasttrack.nn.vit: the shared reference ViT pieces and their fused twins."""
import pytest
import torch
from torch import nn

from fasttrack.nn.linear import FastLinear, panel_serves
from fasttrack.nn.vit import Attention, Block, FusedAttention, FusedBlock, FusedMlp, Mlp, linear_add, linear_gelu
from tests.tolerances import assert_close
from tests import helpers

DIM, HEADS, N = 768, 12, 320


def _block(**kw):
    return helpers.randomise(Block(DIM, HEADS, qkv_bias=True, **kw)).eval()


def test_fused_block_same_keys_and_shapes():
    for qkv_bias in (False, True):
        ref = Block(DIM, HEADS, qkv_bias=qkv_bias)
        fused = FusedBlock(DIM, HEADS, qkv_bias=qkv_bias)
        assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    assert sorted(Block(DIM, HEADS, qkv_bias=True).state_dict()) == sorted([
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"])
    assert isinstance(FusedBlock(DIM, HEADS).attn.qkv, FastLinear)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_block_matches_reference(B, masked):
    ref = _block()
    fused = FusedBlock.from_reference(ref).eval()
    x = torch.randn(B, N, DIM)
    mask = None
    if masked:
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask[:, 5:40] = True
    with torch.no_grad():
        assert fused.attn.qkv.uses_packed(x)  # the fast path is what is compared
        assert_close(fused(x, mask), ref(x, mask), scale=4)
        y_ref, a_ref = ref(x, mask, return_attention=True)
        y, a = fused(x, mask, return_attention=True)
    assert_close(y, y_ref, scale=4)
    assert_close(a, a_ref)
    if not masked:  # OSTrack's vit.py Block is called as blk(x, return_attention)
        with torch.no_grad():
            y2, a2 = fused(x, True)
        assert_close(a2, a_ref)


def test_fused_block_bf16():
    ref = _block().to(torch.bfloat16)
    fused = FusedBlock.from_reference(ref).eval()
    x = torch.randn(2, N, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        out, exp = fused(x), ref(x)
    assert out.dtype == torch.bfloat16
    # bf16 GEMMs with K = 3072 round differently in oneDNN's blocked kernel and in ATen's
    assert_close(out.float(), exp.float(), dtype=torch.bfloat16, scale=4)


def test_from_reference_shares_parameters_and_repacks_on_update():
    ref = _block()
    fused = FusedBlock.from_reference(ref).eval()
    assert all(a is b for a, b in zip(ref.parameters(), fused.parameters()))
    x = torch.randn(1, 64, DIM)
    with torch.no_grad():
        fused(x)
        ref.mlp.fc2.weight.mul_(2.0)  # in place: the packed cache must notice
        assert_close(fused(x), ref(x), scale=4)
    ref.load_state_dict({k: v * 0.5 for k, v in ref.state_dict().items()})
    with torch.no_grad():
        assert_close(fused(x), ref(x), scale=4)


def test_training_forward_backward_matches_reference():
    ref = _block(drop_path=0.2).train()
    fused = FusedBlock.from_reference(ref).train()
    x = torch.randn(3, 80, DIM, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y_ref = ref(x)
    torch.manual_seed(1)
    y = fused(x2)  # same drop-path draws, same order
    assert_close(y, y_ref, scale=4)
    g = torch.randn_like(y)
    y_ref.backward(g)
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    y.backward(g)
    for n, p in fused.named_parameters():
        assert_close(p.grad, grads_ref[n], scale=20)
    assert_close(x2.grad, x.grad, scale=20)


def test_attention_and_mlp_pieces():
    att = helpers.randomise(Attention(DIM, HEADS, qkv_bias=True)).eval()
    fatt = FusedAttention.from_reference(att)
    mlp = helpers.randomise(Mlp(DIM, 4 * DIM)).eval()
    fmlp = FusedMlp.from_reference(mlp)
    x = torch.randn(2, 100, DIM)
    with torch.no_grad():
        assert_close(fatt(x), att(x), scale=4)
        out, q, k, amap = fatt.forward_qk(x, residual=x)
        assert amap is None  # fp32: SDPA
        assert_close(out, x + att(x), scale=4)
        assert q.shape == k.shape == (2, HEADS, 100, DIM // HEADS)
        assert_close(fmlp(x), mlp(x), scale=4)
        assert_close(fmlp.forward_add(x, x), x + mlp(x), scale=4)


def test_epilogue_helpers_fall_back_to_plain_math_when_not_packed():
    fc = FastLinear(16, 32)
    x = torch.randn(3, 16, requires_grad=True)  # needs grad: F.linear path
    assert not fc.uses_packed(x)
    assert_close(linear_gelu(fc, x, nn.GELU()), nn.functional.gelu(fc(x)))
    r = torch.randn(3, 32)
    assert_close(linear_add(fc, x, r), r + fc(x))
    # tanh-GELU is not the post-op oneDNN is asked for: plain path, same result
    with torch.no_grad():
        x0 = x.detach()
        assert_close(linear_gelu(fc, x0, nn.GELU(approximate="tanh")), nn.functional.gelu(fc(x0), approximate="tanh"))


def test_timm_style_mlp_and_errors():
    class TimmMlp(nn.Module):  # newer timm: drop1 / norm / drop2
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop1 = nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.0)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(16, 8), nn.Dropout(0.0)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    m = TimmMlp().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_close(FusedMlp.from_reference(m)(x), m(x))
    m.norm = nn.LayerNorm(16)
    with pytest.raises(TypeError, match="norm"):
        FusedMlp.from_reference(m)
    with pytest.raises(TypeError, match="lacks"):
        FusedBlock.from_reference(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="dim"):
        FusedAttention(10, 3)
    with pytest.raises(ValueError, match="dim"):
        Attention(10, 3)


# ------------------------------------------------------------------------------- FusedPatchEmbed
def _patch_embeds(dtype):
    from fasttrack.nn.vit import FusedPatchEmbed, PatchEmbed
    torch.manual_seed(0)
    ref = PatchEmbed(256, 16, 3, DIM).to(dtype).eval()
    return ref, FusedPatchEmbed.from_reference(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,side", [(1, 256), (1, 128), (2, 256), (3, 48)])
def test_fused_patch_embed_matches_the_conv(dtype, B, side):
    from fasttrack.nn.vit import patch_tokens
    ref, fused = _patch_embeds(dtype)
    x = torch.randn(B, 3, side, side).to(dtype)
    pos = (torch.randn(1, (side // 16) ** 2, DIM) * 0.02).to(dtype)
    with torch.no_grad():
        assert fused.gemm_serves(x) == (dtype in (torch.float32, torch.bfloat16))
        assert_close(fused(x), ref(x), dtype, scale=2)
        assert_close(patch_tokens(fused, x, pos), ref(x) + pos, dtype, scale=2)
        assert_close(patch_tokens(ref, x, pos), ref(x) + pos)


def test_fused_patch_embed_rule_keys_and_weight_updates():
    from fasttrack.nn.vit import FusedPatchEmbed, PatchEmbed
    ref, fused = _patch_embeds(torch.float32)
    assert sorted(fused.state_dict()) == sorted(ref.state_dict()) == ["proj.bias", "proj.weight"]
    assert fused.proj is ref.proj
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert fused.gemm_serves(x)
        assert not fused.gemm_serves(torch.randn(1, 3, 120, 136))   # sides the stride does not divide
        before = fused(x)
        ref.proj.weight.mul_(2)                                    # in place: the packed copy is rebuilt
        assert_close(fused(x), ref(x))
        assert not torch.allclose(fused(x), before)
    x.requires_grad_()
    assert not fused.gemm_serves(x)                                # a gradient is needed: the conv runs
    fused(x).sum().backward()
    assert x.grad is not None
    overlapping = PatchEmbed(64, 16, 3, 32)
    overlapping.proj = nn.Conv2d(3, 32, 16, stride=8)
    with torch.no_grad():
        f = FusedPatchEmbed.from_reference(overlapping)
        y = torch.randn(1, 3, 64, 64)
        assert not f.gemm_serves(y)
        assert_close(f(y), overlapping(y))
    with pytest.raises(TypeError, match="Conv2d `proj`"):
        FusedPatchEmbed.from_reference(nn.Linear(3, 4))


# --------------------------------------------------------------------------------------------
# The native block (one C++ call per half-block): bit-identical to the Python path, and its rule
# --------------------------------------------------------------------------------------------
import fasttrack.nn.vit as vit_mod  # noqa: E402
from fasttrack import _extension  # noqa: E402
from fasttrack.nn.vit import native_block_serves  # noqa: E402

_NATIVE_BUILT = vit_mod._NATIVE is not None
native_only = pytest.mark.skipif(not _NATIVE_BUILT, reason="fasttrack._C not built")


def _python_path(fn, monkeypatch):
    """``fn()`` with the native block switched off (the Python composition it must equal)."""
    with monkeypatch.context() as m:
        m.setattr(vit_mod, "_NATIVE", None)
        return fn()


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,n", [(1, 320), (2, 153), (1, 720)])
def test_native_block_is_the_python_path_bit_for_bit(dtype, B, n, monkeypatch):
    fused = FusedBlock.from_reference(_block().to(dtype)).eval()
    x = torch.randn(B, n, DIM).to(dtype)
    with torch.no_grad():
        assert native_block_serves(fused, x) == (vit_mod.fast_path_serves(dtype, 64), True)
        got = (fused(x), *fused.attn_residual(x)[:3], fused.mlp_residual(x))
        want = _python_path(lambda: (fused(x), *fused.attn_residual(x)[:3], fused.mlp_residual(x)), monkeypatch)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)


@native_only
def test_native_block_runs_where_it_serves():
    """The profiler sees one `fasttrack::vit_block` event per plain block call and the two halves
    where a caller needs q / k in between (CE)."""
    from torch.profiler import ProfilerActivity, profile
    fused = FusedBlock.from_reference(_block()).eval()
    x = torch.randn(1, 64, DIM)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fused(x)
        y, q, k, amap = fused.attn_residual(x)
        fused.mlp_residual(y)
    names = [e.name for e in prof.events()]
    assert names.count("fasttrack::vit_block") == 1
    assert names.count("fasttrack::vit_attn_residual") == 1 and names.count("fasttrack::vit_mlp_residual") == 1
    # the kernels it calls directly keep their own events (`python -m bench profile` segments)
    from bench.profile import segment_of
    assert names.count("fasttrack::_attention") == 2 and names.count("fasttrack::_layer_norm") == 4
    assert segment_of("fasttrack::_attention") == "attention"
    assert amap is None and q.shape == k.shape == (1, HEADS, 64, DIM // HEADS)


@native_only
def test_native_block_rule(monkeypatch):
    from fasttrack.backend import use_backend
    fused = FusedBlock.from_reference(_block()).eval()
    x = torch.randn(2, 50, DIM)
    serves = lambda m=fused, t=x, mask=None: native_block_serves(m, t, mask)  # noqa: E731
    assert not any(serves())                                 # grad mode on, parameters require grad
    with torch.no_grad():
        assert serves() == (True, True)
        assert serves(mask=torch.zeros(2, 50, dtype=torch.bool)) == (False, True)
        assert serves(t=x.transpose(0, 1).contiguous().transpose(0, 1)) == (False, False)   # not contiguous
        assert serves(t=x.double()) == (False, False)                                      # no packed float64
        assert serves(t=x[0]) == (False, False)                                             # not [B, N, C]
        with use_backend("reference"):
            assert serves() == (False, False)
        heads = FusedBlock.from_reference(helpers.randomise(Block(DIM, 8, qkv_bias=True)).eval()).eval()
        assert serves(heads) == (False, True)                 # head dim 96: the kernel's vectorised path is 64
        tanh = FusedBlock.from_reference(_block(act_layer=lambda: nn.GELU(approximate="tanh"))).eval()
        assert serves(tanh) == (True, False)
        ln = FusedBlock.from_reference(_block()).eval()
        ln.norm2 = type("MyNorm", (nn.LayerNorm,), {})(DIM)   # a LayerNorm subclass may compute otherwise
        assert serves(ln) == (True, False)
        ln.norm1 = nn.LayerNorm(DIM + 1)
        assert serves(ln) == (False, False)
        nobias = FusedBlock.from_reference(helpers.randomise(Block(DIM, HEADS, qkv_bias=False)).eval()).eval()
        assert serves(nobias) == (True, True)
        y = nobias(x)
        torch.testing.assert_close(y, _python_path(lambda: nobias(x), monkeypatch), rtol=0, atol=0)
        drop = FusedBlock.from_reference(_block(drop_path=0.1)).eval()
        assert serves(drop) == (True, True)                   # eval: drop-path inactive
        drop.train()
        assert serves(drop) == (False, False)
        drop.eval()
        drop.attn.attn_drop.train()
        drop.attn.attn_drop.p = 0.2
        drop.attn.train()
        assert serves(drop) == (False, True)
    with torch.inference_mode():
        assert serves() == (True, True)


def test_native_block_needs_the_extension(monkeypatch):
    monkeypatch.setattr(vit_mod, "_NATIVE", None)
    fused = FusedBlock.from_reference(_block()).eval()
    with torch.no_grad():
        assert native_block_serves(fused, torch.randn(1, 8, DIM)) == (False, False)
    assert _NATIVE_BUILT == _extension.loaded


@native_only
def test_native_block_raw_calls_refuse_bad_input():
    """Called directly with the wrong tensors, the native functions raise; nothing crashes."""
    C = vit_mod._NATIVE
    fused = FusedBlock.from_reference(_block()).eval()
    x = torch.randn(1, 10, DIM)
    with torch.no_grad():
        args = vit_mod._native_attn_args(fused, x)
        margs = vit_mod._native_mlp_args(fused, x)
        with pytest.raises(ValueError, match="`x` must be a contiguous"):
            C.vit_attn_residual(x[0], *args)
        with pytest.raises(ValueError, match="`x` must be a contiguous"):
            C.vit_mlp_residual(x.transpose(1, 2), *margs)
        with pytest.raises(ValueError, match="`x` must be floating"):
            C.vit_block(x.long(), *args, *margs)
        with pytest.raises(ValueError, match=r"`weight` must have shape \[776\]"):
            C.vit_attn_residual(torch.randn(1, 10, DIM + 8), *args)   # the norm refuses the width
        # without norm parameters the GEMM refuses the width: the panel GEMM names x, oneDNN does not
        with pytest.raises(ValueError if panel_serves(fused.attn.qkv.weight) else RuntimeError,
                           match="`x`'s last dim must be the weight's in_features" if panel_serves(
                               fused.attn.qkv.weight) else None):
            C.vit_attn_residual(torch.randn(1, 10, DIM + 8), None, None, *args[2:])
        bad = list(args)
        bad[3:5] = margs[3:5]                                 # fc1's 768 -> 3072 weight as qkv
        with pytest.raises(ValueError, match="qkv"):
            C.vit_attn_residual(x, *bad)
        bad = list(args)
        bad[-2] = 0
        with pytest.raises(ValueError, match="num_heads"):
            C.vit_attn_residual(x, *bad)


# --------------------------------------------------------------------------------------------
# native_plan: every block's native arguments decided once per backbone forward
# --------------------------------------------------------------------------------------------
@native_only
def test_native_plan_follows_the_rule_hooks_and_compile():
    blocks = [FusedBlock.from_reference(_block()).eval() for _ in range(3)] + [_block().eval()]
    x = torch.randn(1, 50, DIM)
    unserved = [(None, None, torch.float32)] * 3 + [None]       # both halves in Python, decided once
    assert vit_mod.native_plan(blocks, x) == unserved           # grad mode on, parameters require grad
    with torch.no_grad():
        plan = vit_mod.native_plan(blocks, x)
        assert [p is not None for p in plan] == [True, True, True, False]   # a reference block: no entry
        for b, p in zip(blocks, plan[:3]):
            assert p == (vit_mod._native_attn_args(b, x), vit_mod._native_mlp_args(b, x), x.dtype) and None not in p
        handle = blocks[1].register_forward_pre_hook(lambda m, a: None)
        assert vit_mod.native_plan(blocks, x)[1] is None         # hooked: called as a module, hooks run
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
        assert vit_mod.native_plan(blocks, x) == [None] * 4      # a global hook sees every call
        handle.remove()
        assert vit_mod.native_plan(blocks, x.double()) == [(None, None, torch.float64)] * 3 + [None]
        strided = torch.randn(50, 2, DIM).transpose(0, 1)
        assert vit_mod.native_plan(blocks, strided) == [None] * 4            # the tokens are not contiguous
        assert vit_mod.native_plan([], x) == []
        blocks[2].compile()                                       # Module.compile: its compiled call
        assert vit_mod.native_plan(blocks, x)[2] is None
        heads = FusedBlock.from_reference(helpers.randomise(Block(DIM, 8, qkv_bias=True)).eval()).eval()
        assert vit_mod.native_plan([heads], x) == [(None, vit_mod._native_mlp_args(heads, x), x.dtype)]   # per half
        own_forward = FusedBlock.from_reference(_block()).eval()
        own_forward.forward = own_forward.forward                 # e.g. torch.compile(block.forward)
        called = type("CalledBlock", (FusedBlock,), {"__call__": lambda self, *a, **k: FusedBlock.forward(self, *a)})
        own_call = called.from_reference(_block()).eval()
        assert vit_mod.native_plan([own_forward, own_call], x) == [None, None]


@native_only
def test_planned_block_is_the_unplanned_block_bit_for_bit():
    fused = FusedBlock.from_reference(_block()).eval()
    x = torch.randn(2, 61, DIM)
    with torch.no_grad():
        (planned,) = vit_mod.native_plan([fused], x)
        assert torch.equal(vit_mod.call_block(fused, planned, x), fused(x))
        assert torch.equal(fused.mlp_residual(x, planned), fused.mlp_residual(x))
        for a, b in zip(fused.attn_residual(x, native_args=planned)[:3], fused.attn_residual(x)[:3]):
            assert torch.equal(a, b)
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)      # a non-contiguous x: the Python path
        assert torch.equal(fused(xs, native_args=planned), fused(xs))
        mask = torch.zeros(2, 61, dtype=torch.bool)
        assert torch.equal(fused(x, mask, native_args=planned), fused(x, mask))
        assert vit_mod.call_block(fused, None, x).shape == x.shape


@native_only
def test_planned_blocks_keep_the_graph_when_the_tokens_start_needing_a_gradient():
    """A trainable block in front of frozen ones (replacement training, partial fine-tuning): the
    tokens need a gradient only after the plan was made; the frozen blocks then run in Python and
    the gradients equal those of plain module calls."""
    trainable = FusedBlock.from_reference(_block()).eval()
    frozen = [FusedBlock.from_reference(_block()).eval().requires_grad_(False) for _ in range(2)]
    blocks = [*frozen[:1], trainable, *frozen[1:]]
    x = torch.randn(1, 40, DIM)
    plan = vit_mod.native_plan(blocks, x)
    assert plan[0].attn is not None and plan[1] == (None, None, x.dtype) and plan[2].attn is not None
    y = x
    for b, p in zip(blocks, plan):
        y = vit_mod.call_block(b, p, y)
    y.square().sum().backward()
    got = [t.grad.clone() for t in trainable.parameters()]
    trainable.zero_grad()
    y = x
    for b in blocks:
        y = b(y)
    y.square().sum().backward()
    for a, b in zip(got, (t.grad for t in trainable.parameters())):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in got)


def _tree_equal(a, b) -> bool:
    from torch.utils._pytree import tree_flatten
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    return sa == sb and all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(fa, fb))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["ostrack", "utptrack-o", "compresstracker"])
def test_backbones_decide_the_native_path_once_per_forward(family, dtype, monkeypatch):
    """The rule runs for every block before the first block runs (the plan), never inside the
    blocks, and the result is the unplanned forward's bit for bit; a hooked block is still called
    as a module (its hook runs)."""
    from types import SimpleNamespace
    from fasttrack import zoo
    from fasttrack.nn import compresstracker, ostrack
    from fasttrack.nn.utptrack import o as utptrack_o
    case = zoo.build(family, 1, dtype, depth=4)
    inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case.inputs)
    n_blocks = sum(isinstance(m, FusedBlock) for m in case.fused.modules())
    events = []
    rule, native = vit_mod._native_attn_args, vit_mod._NATIVE
    monkeypatch.setattr(vit_mod, "_native_attn_args", lambda *a, **k: events.append("rule") or rule(*a, **k))
    monkeypatch.setattr(vit_mod, "_NATIVE", SimpleNamespace(**{
        f: (lambda f: lambda *a: events.append("block") or getattr(native, f)(*a))(f)
        for f in ("vit_block", "vit_attn_residual", "vit_mlp_residual")}))
    with torch.no_grad():
        got = case.fused(*inputs)
        assert n_blocks >= 4 and events[:n_blocks] == ["rule"] * n_blocks
        assert "rule" not in events[n_blocks:] and events.count("block") >= n_blocks
        hooked = []
        block = next(m for m in case.fused.modules() if isinstance(m, FusedBlock))
        handle = block.register_forward_hook(lambda m, a, o: hooked.append(m))
        assert _tree_equal(case.fused(*inputs), got) and hooked == [block]
        handle.remove()
        for mod in (ostrack, compresstracker, utptrack_o):
            monkeypatch.setattr(mod, "native_plan", lambda blocks, x: [None] * len(blocks))
        events.clear()
        assert _tree_equal(case.fused(*inputs), got)
        assert events[:3] == ["rule", "block", "rule"]            # unplanned: each block asks in turn


@native_only
@pytest.mark.parametrize("family", ["ostrack", "utptrack-o", "compresstracker"])
def test_fused_backbones_final_norm_runs_the_layer_norm_kernel(family, monkeypatch):
    from fasttrack import zoo
    case = zoo.build(family, 1, torch.bfloat16, depth=2)
    inputs = tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in case.inputs)
    seen = []
    norm_forward = vit_mod.norm_forward
    monkeypatch.setattr(vit_mod, "norm_forward", lambda norm, x: seen.append(norm) or norm_forward(norm, x))
    kernel = helpers.count_kernel_calls(monkeypatch, "_layer_norm")
    with torch.no_grad():
        case.reference(*inputs)
        assert seen == [] and kernel == []                    # the reference: torch's LayerNorm
        case.fused(*inputs)
    assert seen == [case.fused.backbone.norm] and len(kernel) == 1
    hooked = []
    case.fused.backbone.norm.register_forward_hook(lambda m, a, o: hooked.append(o))
    with torch.no_grad():
        case.fused(*inputs)                                   # a hooked norm is called as a module
    assert len(hooked) == 1 and len(seen) == 1 and len(kernel) == 1
