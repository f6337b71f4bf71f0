"""ETCTrack family: the documented key layout, the compressor's semantics against the merge spec,
reference vs fused parity at the real config (T=5, L=64, C=768, r=0.7; 16x16 search map), and
training through the fused modules."""
import pytest
import torch
import torch.nn.functional as F

import fasttrack
from fasttrack import reference
from fasttrack.nn.etctrack import (
    ConvFFN, FusedConvFFN, FusedHIBlock, FusedTokenCompressor, HIBlock, TokenCompressor,
)
from tests.tolerances import assert_close

C, T, L, R = 768, 5, 64, 0.7
BLOCK_LEAVES = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                "mlp.fc2.bias"]


def spec(fn, *args):
    """Reference modules run the ops' spec (`fasttrack.reference`); fused modules run the default
    backend (the native kernels), so parity covers the whole fast path."""
    with fasttrack.use_backend("reference"):
        return fn(*args)


def documented_compressor_keys(depth):
    return ["temporal_pos_embed", "score_proj"] + [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_LEAVES]


def documented_hiblock_keys(depth):
    ca = ["norm_q.weight", "norm_q.bias", "norm_kv.weight", "norm_kv.bias", "attn.q.weight", "attn.q.bias",
          "attn.kv.weight", "attn.kv.bias", "attn.proj.weight", "attn.proj.bias"]
    ffn = [f"conv_ffn.{m}.{p}" for m in ("norm", "fc1", "dwconv", "fc2") for p in ("weight", "bias")]
    return ([f"template_cross.{k}" for k in ca] + [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_LEAVES]
            + [f"search_cross.{k}" for k in ca] + ffn)


# --------------------------------------------------------------------------------------------
# Key layout
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TokenCompressor, FusedTokenCompressor])
def test_compressor_keys_load_strict(cls):
    m = cls(depth=2)
    sd = m.state_dict()
    assert sorted(sd) == sorted(documented_compressor_keys(2))
    assert sd["temporal_pos_embed"].shape == (T, 1, C) and sd["score_proj"].shape == (C,)
    assert "score_proj" not in dict(m.named_parameters())        # fixed, not trained
    new = {k: torch.randn_like(v) for k, v in sd.items()}
    other = cls(depth=2, seed=5)
    other.load_state_dict(new, strict=True)
    torch.testing.assert_close(other.score_proj, new["score_proj"], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [HIBlock, FusedHIBlock])
def test_hiblock_keys_load_strict(cls):
    m = cls(depth=2)
    sd = m.state_dict()
    assert sorted(sd) == sorted(documented_hiblock_keys(2))
    assert sd["template_cross.attn.kv.weight"].shape == (2 * C, C)
    assert sd["conv_ffn.dwconv.weight"].shape == (4 * C, 1, 3, 3)
    m.load_state_dict({k: torch.randn_like(v) for k, v in sd.items()}, strict=True)


def test_projection_is_seeded():
    a, b, c = TokenCompressor(depth=0, seed=3), TokenCompressor(depth=0, seed=3), TokenCompressor(depth=0, seed=4)
    torch.testing.assert_close(a.score_proj, b.score_proj, rtol=0, atol=0)
    assert not torch.equal(a.score_proj, c.score_proj)
    torch.testing.assert_close(a.score_proj.norm(), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------
# Semantics
# --------------------------------------------------------------------------------------------
def test_compressor_is_temporal_encoding_then_merge():
    """With no correlation blocks the compressor is exactly merge(z + per-frame embedding)."""
    m = TokenCompressor(depth=0)
    z = torch.randn(2, T, L, C)
    out = spec(m, z)
    zz = (z + m.temporal_pos_embed.detach()[None]).reshape(2, T * L, C)
    want = reference.merge_tokens(zz, None, m.score_proj, None, R)
    K = int(R * T * L)
    assert out.merged.shape == (2, K, C) and out.source_index.shape == (2, T * L - K)
    for got, exp in zip(out, want):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    # a flat [B, T*L, C] input is read frame-major
    for got, exp in zip(spec(m, z.reshape(2, T * L, C)), out):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [ConvFFN, FusedConvFFN])
def test_conv_ffn_reads_the_search_map(cls):
    """The channels-last view is the row-major H x W map of the tokens."""
    torch.manual_seed(0)
    m = cls(32, (4, 6), ffn_ratio=2.0).eval()
    x = torch.randn(3, 24, 32)
    h = m.fc1(m.norm(x))                                             # [B, 24, 64]
    grid = h.permute(0, 2, 1).reshape(3, 64, 4, 6).contiguous()
    y = F.gelu(F.conv2d(grid, m.dwconv.weight, m.dwconv.bias, padding=1, groups=64))
    want = x + m.fc2(y.flatten(2).transpose(1, 2))
    with torch.no_grad():
        assert_close(m(x), want.detach())


def test_hiblock_order_of_operations():
    """Reference HIBlock = template←search CA, blocks on [z, x], search←template CA, ConvFFN."""
    torch.manual_seed(0)
    m = HIBlock(dim=64, num_heads=4, depth=1, search_hw=(4, 4)).eval()
    z, x = torch.randn(2, 7, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        z1 = z + m.template_cross.attn(m.template_cross.norm_q(z), m.template_cross.norm_kv(x))
        t = m.blocks[0](torch.cat([z1, x], 1))
        z2, x2 = t[:, :7], t[:, 7:]
        x3 = x2 + m.search_cross.attn(m.search_cross.norm_q(x2), m.search_cross.norm_kv(z2))
        x4 = m.conv_ffn(x3)
        zo, xo = m(z, x)
    torch.testing.assert_close(zo, z2, rtol=0, atol=0)
    torch.testing.assert_close(xo, x4, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Parity at the real config
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
def test_compressor_and_hiblock_parity_real_config(batch):
    torch.manual_seed(batch)
    comp = TokenCompressor(C, T, L, R, depth=1).eval()
    hib = HIBlock(C, 12, depth=2, search_hw=(16, 16)).eval()
    fcomp, fhib = FusedTokenCompressor.from_reference(comp), FusedHIBlock.from_reference(hib)
    assert all(a is b for a, b in zip(fcomp.parameters(), comp.parameters()))
    assert fcomp.score_proj is comp.score_proj
    assert list(fhib.state_dict()) == list(hib.state_dict())
    z, x = torch.randn(batch, T, L, C), torch.randn(batch, 256, C)
    with torch.no_grad():
        a, b = spec(comp, z), fcomp(z)
        for name in ("target_index", "source_index", "assignment"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert_close(b.merged, a.merged, scale=10)
        za, xa = spec(hib, a.merged, x)
        zb, xb = fhib(b.merged, x)
    assert za.shape == (batch, 224, C) and xa.shape == (batch, 256, C)
    assert_close(zb, za, scale=10)
    assert_close(xb, xa, scale=10)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def test_training_forward_backward_fused_matches_reference():
    torch.manual_seed(0)
    comp = TokenCompressor(64, 3, 16, 0.5, depth=1, num_heads=4, drop_path=0.1)
    hib = HIBlock(64, 4, depth=1, search_hw=(4, 4), drop_path=0.1)
    fcomp, fhib = FusedTokenCompressor.from_reference(comp), FusedHIBlock.from_reference(hib)
    assert fcomp.training and fhib.training
    z, x = torch.randn(2, 3, 16, 64), torch.randn(2, 16, 64)
    grads = []
    for c, h, backend in ((comp, hib, "reference"), (fcomp, fhib, fasttrack.current_backend())):
        torch.manual_seed(7)   # same drop-path draws for both twins
        for p in [*comp.parameters(), *hib.parameters()]:
            p.grad = None
        with fasttrack.use_backend(backend):
            zz, xx = h(c(z).merged, x)
            (zz.square().mean() + xx.square().mean()).backward()
        grads.append({k: p.grad.clone() for k, p in [*comp.named_parameters(prefix="c"),
                                                       *hib.named_parameters(prefix="h")]})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for k, g in grads[0].items():
        assert_close(grads[1][k], g, scale=10)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    m = TokenCompressor(64, 3, 16, 0.5, depth=0, num_heads=4)
    with pytest.raises(ValueError, match="`z`"):
        m(torch.randn(2, 4, 16, 64))
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenCompressor(keep_ratio=0.0)
    with pytest.raises(ValueError, match="reduce"):
        TokenCompressor(reduce="max")
    h = HIBlock(64, 4, depth=0, search_hw=(4, 4))
    with pytest.raises(ValueError, match="`x`"):
        h(torch.randn(2, 5, 64), torch.randn(2, 15, 64))
    with pytest.raises(ValueError, match="`z`"):
        h(torch.randn(2, 5, 32), torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match="batch"):
        h(torch.randn(1, 5, 64), torch.randn(2, 16, 64))
    with pytest.raises(TypeError, match="ref_module"):
        FusedHIBlock.from_reference(m)


def test_patch_model_swaps_compressor_and_hiblock():
    torch.manual_seed(0)

    class Tracker(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.compressor = TokenCompressor(64, 3, 16, 0.5, depth=1, num_heads=4)
            self.interaction = torch.nn.ModuleList([HIBlock(64, 4, depth=1, search_hw=(4, 4)) for _ in range(2)])

        def forward(self, z, x):
            z = self.compressor(z).merged
            for blk in self.interaction:
                z, x = blk(z, x)
            return z, x

    net = Tracker().eval()
    z, x = torch.randn(2, 3, 16, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        before = spec(net, z, x)
    report = fasttrack.patch_model(net)
    assert sorted(rec for _, rec, _, _ in report.swapped) == ["etctrack.hi_block"] * 2 + ["etctrack.token_compressor"]
    assert isinstance(net.compressor, FusedTokenCompressor) and isinstance(net.interaction[1], FusedHIBlock)
    with torch.no_grad():
        after = net(z, x)
    for a, b in zip(after, before):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parity(dtype):
    """In bf16/fp16 the correlation blocks' rounding can reorder near-equal scores, so the merge is
    compared on identical inputs (depth 0) and the HIBlock on the same merged tokens."""
    torch.manual_seed(5)
    comp = TokenCompressor(64, 3, 16, 0.5, depth=0, num_heads=4).to(dtype).eval()
    hib = HIBlock(64, 4, depth=1, search_hw=(4, 4)).to(dtype).eval()
    fcomp, fhib = FusedTokenCompressor.from_reference(comp), FusedHIBlock.from_reference(hib)
    z, x = torch.randn(2, 3, 16, 64, dtype=dtype), torch.randn(2, 16, 64, dtype=dtype)
    with torch.no_grad():
        a, b = spec(comp, z), fcomp(z)
        for name in ("target_index", "source_index", "assignment"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert_close(b.merged, a.merged)
        za, xa = spec(hib, a.merged, x)
        zb, xb = fhib(a.merged, x)
    assert zb.dtype == xb.dtype == dtype
    assert_close(zb, za, scale=4)
    assert_close(xb, xa, scale=4)


def test_encoder_parity_and_keys():
    """Compressor + interaction stages (2 stages of 1 block here for time; the parts are covered
    at the real config above)."""
    from fasttrack.nn.etctrack import ETCTrackEncoder, FusedETCTrackEncoder
    torch.manual_seed(8)
    ref = ETCTrackEncoder(num_stages=2, stage_depth=1).eval()
    fused = FusedETCTrackEncoder.from_reference(ref)
    keys = ["compressor." + k for k in documented_compressor_keys(1)]
    keys += [f"stages.{k}.{n}" for k in range(2) for n in documented_hiblock_keys(1)]
    assert sorted(ref.state_dict()) == sorted(keys) == sorted(fused.state_dict())
    z, x = torch.randn(2, T, L, C), torch.randn(2, 256, C)
    with torch.no_grad():
        (za, xa), (zb, xb) = spec(ref, z, x), fused(z, x)
    assert_close(zb, za, scale=10)
    assert_close(xb, xa, scale=10)
