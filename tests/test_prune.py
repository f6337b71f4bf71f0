"""`fasttrack.prune` and the pruned ViT block: kept-dim selection, a converted ViT-B block equal to
the masked dense (reference) block, and the pruned checkpoint round trip."""
import pytest
import torch
from torch import nn

from fasttrack import _extension, prune
from fasttrack.backend import use_backend
from fasttrack.nn.pruned import MaskedBlock, PrunedBlock, PrunedLinear
from fasttrack.nn.vit import Block
from tolerances import assert_close

native_only = pytest.mark.skipif(not _extension.loaded, reason="the native CPU kernel needs fasttrack._C")


def _vit_block(dim=768, heads=12, dtype=torch.float32):
    """A ViT-B block with trained-like random weights (std 0.02, biases and LN affine not trivial)."""
    blk = Block(dim, heads, qkv_bias=True).eval()
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.1)
    return blk.to(dtype)


def test_kept_count():
    assert prune.kept_count(768, 0.7, 12) == 528          # floor(537.6 / 12) · 12
    assert prune.kept_count(768, 0.75, 12) == 576
    assert prune.kept_count(768, 0.71, 12) == 540
    assert prune.kept_count(192, 0.5, 3) == 96
    assert prune.kept_count(768, 0.001, 12) == 12         # at least one dim per head
    with pytest.raises(ValueError, match="sigma"):
        prune.kept_count(768, 1.5, 12)
    with pytest.raises(ValueError, match="num_heads"):
        prune.kept_count(770, 0.5, 12)


def test_select_kept_ranking():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.2])
    # top 4 by score, the tie at 0.9 goes to dim 1 first; returned ascending
    assert prune.select_kept(scores, 4 / 6, 2).tolist() == [1, 2, 3, 4]
    # per head (groups [0, 3) and [3, 6)): the top 2 of each
    assert prune.select_kept(scores, 4 / 6, 2, per_head=True).tolist() == [1, 2, 3, 4]
    s = torch.tensor([9.0, 8.0, 7.0, 0.0, 1.0, 2.0])
    assert prune.select_kept(s, 4 / 6, 2).tolist() == [0, 1, 2, 5]
    assert prune.select_kept(s, 4 / 6, 2, per_head=True).tolist() == [0, 1, 4, 5]
    idx = prune.select_kept(torch.rand(768), 0.71, 12, per_head=True)
    assert idx.numel() == 540 and torch.equal(torch.bincount(idx // 64, minlength=12), torch.full((12,), 45))


@pytest.mark.parametrize("per_head", [False, True], ids=["block-ranked", "head-aligned"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_converted_vit_b_block_equals_masked_dense(per_head, grad):
    blk = _vit_block()
    i1 = prune.select_kept(torch.rand(768), 0.71, 12, per_head=per_head)
    i2 = prune.select_kept(torch.rand(768), 0.5, 12)
    pruned, masked = prune.prune_block(blk, i1, i2), prune.masked_block(blk, i1, i2)
    assert isinstance(pruned, PrunedBlock) and isinstance(masked, MaskedBlock)
    assert pruned.attn.qkv.weight.shape == (2304, 540) and pruned.mlp.fc1.weight.shape == (3072, 384)
    x = torch.randn(1, 320, 768)
    with torch.set_grad_enabled(grad):
        if _extension.loaded:
            assert pruned.attn.qkv.uses_packed(x) != grad
        y = pruned(x)
        want = masked(x)
    # 4 chained GEMMs with K up to 3072 plus softmax: a wider fp32 tolerance than one product
    assert_close(y, want, scale=10)
    if grad:
        y.square().mean().backward()
        g_qkv, g_fc1, g_ln1 = pruned.attn.qkv.weight.grad, pruned.mlp.fc1.weight.grad, blk.norm1.weight.grad.clone()
        blk.zero_grad()
        masked(x).square().mean().backward()
        assert_close(g_qkv, blk.attn.qkv.weight.grad[:, i1], scale=10)
        assert_close(g_fc1, blk.mlp.fc1.weight.grad[:, i2], scale=10)
        assert_close(g_ln1, blk.norm1.weight.grad, scale=10)
        # the masked dense weight gets no gradient on pruned input dims
        pruned_dims = torch.ones(768, dtype=torch.bool).index_fill_(0, i1, False)
        assert torch.all(blk.attn.qkv.weight.grad[:, pruned_dims] == 0)


def test_block_with_mask_and_attention_map():
    blk = _vit_block(192, 3)
    i1, i2 = prune.select_kept(torch.rand(192), 0.5, 3), prune.select_kept(torch.rand(192), 0.75, 3)
    pruned, masked = prune.prune_block(blk, i1, i2), prune.masked_block(blk, i1, i2)
    x = torch.randn(2, 37, 192)
    key_mask = torch.zeros(2, 37, dtype=torch.bool)
    key_mask[1, :5] = True
    with torch.no_grad():
        y, attn = pruned(x, key_mask, return_attention=True)
        y0, attn0 = masked(x, key_mask, return_attention=True)
        assert_close(y, y0, scale=10)
        assert_close(attn, attn0, scale=10)
        assert_close(pruned(x, key_mask), y0, scale=10)    # SDPA path


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_converted_block_low_precision(dtype):
    blk = _vit_block(192, 3, dtype)
    i1, i2 = prune.select_kept(torch.rand(192), 0.5, 3), prune.select_kept(torch.rand(192), 0.5, 3)
    x = torch.randn(1, 64, 192, dtype=dtype)
    with torch.no_grad():
        y, y0 = prune.prune_block(blk, i1, i2)(x), prune.masked_block(blk, i1, i2)(x)
    # bf16 roundings in every layer of both: a few bf16 ulps of the residual stream
    assert_close(y.float(), y0.float(), dtype=dtype, scale=4)


def test_reference_backend_runs_the_same_block():
    blk = _vit_block(192, 3)
    i1, i2 = prune.select_kept(torch.rand(192), 0.5, 3), prune.select_kept(torch.rand(192), 0.5, 3)
    pruned = prune.prune_block(blk, i1, i2)
    x = torch.randn(1, 20, 192)
    with torch.no_grad():
        y = pruned(x)
        with use_backend("reference"):
            assert_close(pruned(x), y, scale=10)


class _Backbone(nn.Module):
    def __init__(self, depth=2, dim=192, heads=3):
        super().__init__()
        self.blocks = nn.Sequential(*[_vit_block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.blocks(x))


def test_prune_model_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = _Backbone()
    kept = {f"blocks.{i}": (prune.select_kept(torch.rand(192), s, 3), prune.select_kept(torch.rand(192), s, 3))
            for i, s in enumerate((0.5, 0.75))}         # a different kept count per block
    prune.prune_model(model, kept)
    assert all(isinstance(b, PrunedBlock) for b in model.blocks)
    path = tmp_path / "pruned.pt"
    prune.save_pruned(model, path)
    sd = torch.load(path)
    assert sd["blocks.0.attn.qkv.weight"].shape == (576, 96) and sd["blocks.1.mlp.fc1.in_index"].numel() == 144
    assert torch.equal(sd["blocks.1.attn.proj.in_index"], kept["blocks.1"][0])

    fresh = _Backbone()                                   # the dense architecture, other weights
    prune.load_pruned(fresh, path)
    x = torch.randn(2, 30, 192)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # a pruned module of another kept count also takes the checkpoint (resized on load)
    other = PrunedLinear(192, 576, torch.arange(10))
    other.load_state_dict({k[len("blocks.0.attn.qkv."):]: v for k, v in sd.items()
                           if k.startswith("blocks.0.attn.qkv.")})
    assert other.weight.shape == (576, 96) and torch.equal(other.in_index, kept["blocks.0"][0])


def test_empty_block_loads_state_dict():
    blk = _vit_block(192, 3)
    i = prune.select_kept(torch.rand(192), 0.5, 3)
    pruned = prune.prune_block(blk, i, i)
    fresh = PrunedBlock.empty(192, 3, attn_kept=48, mlp_kept=48)
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(1, 9, 192)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x), atol=0, rtol=0)


@native_only
def test_pruned_block_torch_compile():
    blk = _vit_block(192, 3)
    i1, i2 = prune.select_kept(torch.rand(192), 0.5, 3), prune.select_kept(torch.rand(192), 0.5, 3)
    pruned = prune.prune_block(blk, i1, i2)
    x = torch.randn(1, 20, 192)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(pruned, fullgraph=True)(x), pruned(x), scale=10)
