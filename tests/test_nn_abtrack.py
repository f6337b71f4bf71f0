"""ABTrack family: bypass gating (reference runs the whole batch, fused runs only the kept samples,
static mode computes both), the documented key layout, backbone parity at ViT-B/16 128/256 px,
and training through the straight-through gate."""
import pytest
import torch

from fasttrack.nn.abtrack import (
    ABTrackBackbone, BypassBlock, FusedABTrackBackbone, FusedBypassBlock, build_abtrack,
)
from fasttrack.nn.pruned import MaskedBlock, PrunedBlock
from fasttrack.nn.vit import Block, FusedBlock
from fasttrack.prune import masked_block, select_kept
from tests.tolerances import assert_close

C = 768
N_TOKENS = 64 + 256 + 1
BLOCK_LEAVES = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                "mlp.fc2.bias"]


def vit_block(dim=C, heads=12):
    return Block(dim, heads, qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))


def pruned_ref_block(dim=C, heads=12, keep=0.7, seed=0):
    """A masked dense ViT block keeping ``keep`` of the dims (ABTrack's pruned block, reference form)."""
    g = torch.Generator().manual_seed(seed)
    kept = [select_kept(torch.rand(dim, generator=g), keep, heads) for _ in range(2)]
    return masked_block(vit_block(dim, heads), *kept)


def split_gate(block: BypassBlock, x: torch.Tensor, skip: torch.Tensor) -> float:
    """Set the gate so exactly the samples in ``skip`` have p > rho: the minimum-norm (weight, bias)
    with logit +1 on them and -1 on the others (B <= C points are linearly separable). Returns the
    smallest |logit| as computed in the gate's dtype (the decision margin)."""
    with torch.no_grad():
        a = torch.cat([x[:, -1].double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        target = torch.where(skip, 1.0, -1.0).double()
        sol = torch.linalg.pinv(a) @ target
        block.gate.weight.copy_(sol[:-1].unsqueeze(0))
        block.gate.bias.fill_(float(sol[-1]))
        logit = torch.nn.functional.linear(x[:, -1], block.gate.weight, block.gate.bias).squeeze(-1)
        assert torch.equal(logit > 0, skip)
        return logit.abs().min().item()


# --------------------------------------------------------------------------------------------
# Bypass block
# --------------------------------------------------------------------------------------------
def test_b8_half_skipping_runs_the_block_on_4_samples():
    """The pruned ViT-B block (keep 0.7) behind a gate, B=8 at 321 tokens, 4 samples skipping."""
    torch.manual_seed(0)
    ref = BypassBlock(pruned_ref_block(), C).eval()
    fused = FusedBypassBlock.from_reference(ref)
    static = FusedBypassBlock.from_reference(ref, static=True)
    assert isinstance(ref.block, MaskedBlock) and isinstance(fused.block, PrunedBlock)
    assert fused.block.attn.qkv.weight.shape == (3 * C, 528) and fused.gate is ref.gate
    x = torch.randn(8, N_TOKENS, C)
    with torch.no_grad():
        x[:, -1] = torch.randn(8, C) * 3       # distinct bypass-token states per sample
    want_skip = torch.tensor([True, False, False, True, True, False, True, False])
    assert split_gate(ref, x, want_skip) > 1e-3
    with torch.no_grad():
        ya, sa = ref(x)
        yb, sb = fused(x)
        yc, sc = static(x)
    assert torch.equal(sa, want_skip) and torch.equal(sb, want_skip) and torch.equal(sc, want_skip)
    assert ref.samples_run == 8 and fused.samples_run == 4 and static.samples_run == 8
    assert_close(yb, ya, scale=10)
    assert_close(yc, ya, scale=10)
    torch.testing.assert_close(yb[want_skip], x[want_skip], rtol=0, atol=0)   # skipped: untouched
    fused.reset_counters()
    assert fused.samples_run == 0


@pytest.mark.parametrize("case", ["all_skip", "none_skip"])
def test_bypass_extremes(case):
    """Also a dense inner block: it becomes a FusedBlock sharing the parameters."""
    torch.manual_seed(1)
    ref = BypassBlock(vit_block(64, 4), 64).eval()
    fused = FusedBypassBlock.from_reference(ref)
    assert isinstance(fused.block, FusedBlock) and fused.block.attn.qkv.weight is ref.block.attn.qkv.weight
    x = torch.randn(3, 10, 64)
    skip = torch.full((3,), case == "all_skip")
    split_gate(ref, x, skip)
    with torch.no_grad():
        ya, _ = ref(x)
        yb, sb = fused(x)
    assert torch.equal(sb, skip)
    assert fused.samples_run == (0 if case == "all_skip" else 3)
    assert_close(yb, ya)


def test_enforced_block_has_no_gate_and_always_runs():
    torch.manual_seed(2)
    ref = BypassBlock(vit_block(64, 4), 64, enforce=True).eval()
    assert ref.gate is None and all(k.startswith("block.") for k in ref.state_dict())
    fused = FusedBypassBlock.from_reference(ref)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        (ya, sa), (yb, sb) = ref(x), fused(x)
    assert not sa.any() and not sb.any() and fused.samples_run == 2
    assert_close(yb, ya)
    with torch.no_grad():
        assert_close(ya, ref.block(x), scale=1)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
def documented_keys(depth, n_enf, inner):
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "pos_embed_z",
            "pos_embed_x", "bypass_token", "norm.weight", "norm.bias"]
    extra = {"dense": [], "masked": ["mask1", "mask2"],
             "pruned": ["attn.qkv.in_index", "attn.proj.in_index", "mlp.fc1.in_index"]}[inner]
    for i in range(depth):
        keys += [f"blocks.{i}.block.{k}" for k in BLOCK_LEAVES + extra]
        if i >= n_enf:
            keys += [f"blocks.{i}.gate.weight", f"blocks.{i}.gate.bias"]
    return keys


def test_backbone_keys_load_strict():
    with torch.device("meta"):
        m = ABTrackBackbone()
    assert sorted(m.state_dict()) == sorted(documented_keys(12, 4, "dense"))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["bypass_token"] == (1, 1, C) and shapes["blocks.4.gate.weight"] == (1, C)
    assert shapes["pos_embed_z"] == (1, 64, C) and shapes["pos_embed_x"] == (1, 256, C)
    m.load_state_dict({k: torch.zeros(s) for k, s in shapes.items()}, strict=True, assign=True)


def test_pruned_backbone_keys_load_strict():
    """Reference (masked dense) and fused (pruned) layouts; a pruned state dict built from the
    documented keys, with other kept counts than the module's, loads strictly."""
    ref = build_abtrack(depth=2, n_enf=1, embed_dim=48, num_heads=4)
    fused = FusedABTrackBackbone.from_reference(ref)
    assert sorted(ref.state_dict()) == sorted(documented_keys(2, 1, "masked"))
    assert sorted(fused.state_dict()) == sorted(documented_keys(2, 1, "pruned"))
    d_kept = 24                                   # kept_count(48, 0.5, 4)
    sd = {}
    for k, v in fused.state_dict().items():
        if k.endswith("in_index"):
            sd[k] = torch.arange(0, 48, 2)
        elif k.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight")):
            sd[k] = torch.randn(v.shape[0], d_kept)
        else:
            sd[k] = torch.randn_like(v.float())
    other = FusedABTrackBackbone.from_reference(build_abtrack(depth=2, n_enf=1, embed_dim=48, num_heads=4, seed=3))
    other.load_state_dict(sd, strict=True)
    assert other.blocks[1].block.mlp.fc1.weight.shape == (192, d_kept)
    torch.testing.assert_close(other.blocks[0].block.attn.proj.in_index, torch.arange(0, 48, 2))


def calibrate(backbone: ABTrackBackbone, z, x, pattern):
    """Walk the reference backbone block by block and set each gate so the samples in
    ``pattern[i]`` ([B] bool) skip block i; returns the smallest decision margin."""
    margin = float("inf")
    with torch.no_grad():
        t = backbone.embed(z, x)
        for i, blk in enumerate(backbone.blocks):
            if blk.gate is not None:
                margin = min(margin, split_gate(blk, t, pattern[i]))
            t, s = blk(t)
            if blk.gate is not None:
                assert torch.equal(s, pattern[i])
    return margin


@pytest.mark.parametrize("batch,depth,n_enf", [(1, 12, 4), (4, 6, 2)])
def test_backbone_parity_real_config(batch, depth, n_enf):
    """Pruned ViT-B/16 (keep 0.7 of the dims) at 128/256 px (the full 12 blocks at B=1; 6 at B=4
    for time); gates set so the samples skip different blocks."""
    torch.manual_seed(batch)
    ref = build_abtrack(0.7, depth=depth, n_enf=n_enf).eval()
    z, x = torch.randn(batch, 3, 128, 128), torch.randn(batch, 3, 256, 256)
    g = torch.Generator().manual_seed(10 + batch)
    pattern = [torch.rand(batch, generator=g) < 0.5 for _ in range(depth)]
    pattern[n_enf + 1] = torch.ones(batch, dtype=torch.bool)        # a block every sample bypasses
    assert calibrate(ref, z, x, pattern) > 1e-4
    fused = FusedABTrackBackbone.from_reference(ref)
    assert all(isinstance(b.block, PrunedBlock) for b in fused.blocks)
    assert fused.bypass_token is ref.bypass_token and fused.blocks[5].gate is ref.blocks[5].gate
    ref.reset_counters()
    with torch.no_grad():
        a, aux_a = ref(z, x)
        b, aux_b = fused(z, x)
    assert a.shape == (batch, 320, C)
    assert torch.equal(aux_a["skipped"], aux_b["skipped"])
    assert torch.equal(aux_b["skipped"][:, n_enf:], torch.stack(pattern, 1)[:, n_enf:])
    assert not aux_b["skipped"][:, :n_enf].any()
    assert [blk.samples_run for blk in fused.blocks] == [batch - int(s.sum()) if i >= n_enf else batch
                                                        for i, s in enumerate(pattern)]
    assert all(blk.samples_run == batch for blk in ref.blocks)
    assert_close(b, a, scale=10)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def test_training_straight_through_gate_fused_matches_reference():
    """Training through the pruned fused backbone: same forward, same gradients as the masked
    dense reference (the pruned weights' gradients are the dense gradients' kept columns)."""
    torch.manual_seed(0)
    ref = build_abtrack(0.5, depth=3, n_enf=1, embed_dim=64, num_heads=4).train()
    fused = FusedABTrackBackbone.from_reference(ref)
    params = {**{"r." + k: p for k, p in ref.named_parameters()}, **{"f." + k: p for k, p in fused.named_parameters()}}
    z, x = torch.randn(3, 3, 128, 128), torch.randn(3, 3, 256, 256)
    outs, grads = [], []
    for m in (ref, fused):
        for p in params.values():
            p.grad = None
        out, aux = m(z, x)
        out.square().mean().backward()
        outs.append((out.detach(), aux["skipped"]))
        grads.append({k: p.grad.clone() for k, p in params.items() if p.grad is not None})
    assert torch.equal(outs[0][1], outs[1][1])
    assert_close(outs[1][0], outs[0][0])
    g_ref, g_fused = grads
    for k in ("r.blocks.1.gate.weight", "r.blocks.2.gate.bias", "r.bypass_token"):
        assert g_ref[k].abs().sum() > 0, k                           # the gate learns through the STE
    shared = [k for k, p in ref.named_parameters() if any(p is q for q in fused.parameters())]
    assert {"r." + k for k in shared} & set(g_ref) == {"r." + k for k in shared} & set(g_fused)
    for k in shared:
        if "r." + k in g_ref:                                        # (cls_token / pos_embed are unused)
            assert_close(g_fused["r." + k], g_ref["r." + k], scale=10)
    for i, blk in enumerate(fused.blocks):                           # pruned copies: the kept columns
        for name in ("attn.qkv", "attn.proj", "mlp.fc1"):
            lin = blk.block.get_submodule(name)
            dense = g_ref[f"r.blocks.{i}.block.{name}.weight"].index_select(1, lin.in_index)
            assert_close(g_fused[f"f.blocks.{i}.block.{name}.weight"], dense, scale=10)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="rho"):
        BypassBlock(vit_block(64, 4), 64, rho=1.5)
    blk = BypassBlock(vit_block(64, 4), 64)
    with pytest.raises(ValueError, match="`x`"):
        blk(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="n_enf"):
        ABTrackBackbone(depth=3, n_enf=4)
    m = ABTrackBackbone(depth=1, n_enf=0, embed_dim=64, num_heads=4)
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 240, 240))
    with pytest.raises(TypeError, match="ref_module"):
        FusedBypassBlock.from_reference(vit_block(64, 4))
    with pytest.raises(TypeError, match="no fused form"):
        FusedBypassBlock(torch.nn.Linear(64, 64), 64)


def test_patch_model_swaps_the_backbone():
    import fasttrack
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.backbone = ABTrackBackbone(depth=3, n_enf=1, embed_dim=64, num_heads=4).eval()
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before, _ = holder.backbone(z, x)
    report = fasttrack.patch_model(holder)
    assert [(p, r) for p, r, _, _ in report.swapped] == [("backbone", "abtrack.backbone")]
    assert isinstance(holder.backbone, FusedABTrackBackbone)
    with torch.no_grad():
        after, _ = holder.backbone(z, x)
    assert_close(after, before)


def test_static_mode_exports():
    """``static=True`` has no data-dependent shapes: `torch.export` traces it, and the exported
    program selects per sample like the reference."""
    torch.manual_seed(3)
    ref = BypassBlock(pruned_ref_block(64, 4, keep=0.5), 64).eval()
    x = torch.randn(4, 10, 64)
    split_gate(ref, x, torch.tensor([True, False, True, False]))
    fused = FusedBypassBlock.from_reference(ref, static=True)
    program = torch.export.export(fused, (x,))
    with torch.no_grad():
        (ya, sa), (yb, sb) = ref(x), program.module()(x)
    assert torch.equal(sa, sb)
    assert_close(yb, ya)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parity(dtype):
    torch.manual_seed(4)
    ref = build_abtrack(0.5, depth=3, n_enf=1, embed_dim=64, num_heads=4).eval().to(dtype)
    z, x = torch.randn(2, 3, 128, 128, dtype=dtype), torch.randn(2, 3, 256, 256, dtype=dtype)
    pattern = [torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([True, True])]
    assert calibrate(ref, z, x, pattern) > 0.05
    fused = FusedABTrackBackbone.from_reference(ref)
    with torch.no_grad():
        (a, aux_a), (b, aux_b) = ref(z, x), fused(z, x)
    assert torch.equal(aux_a["skipped"], aux_b["skipped"]) and b.dtype == dtype
    assert_close(b, a, scale=4)
