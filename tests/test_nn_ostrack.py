"""OSTrack-CE: CEBlock (reference / fused), the ViT-CE backbone, the CENTER head, the full network,
and strict loading of the official key layout."""
import pytest
import torch
from torch import nn

import fasttrack
from fasttrack import reference as R
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
from fasttrack.nn.ostrack import (
    CEBlock, FusedCEBlock, FusedOSTrack, FusedVisionTransformerCE, VisionTransformerCE, build_ostrack,
    ce_query_index, ctr_point_mask,
)
from fasttrack.ops._registry import serving_kernel
from tests.tolerances import assert_close
from tests import helpers

DIM, HEADS = 768, 12
_NATIVE = all(not serving_kernel(op, "cpu").startswith("none")
              for op in ("topk_select", "topk_select_qk", "pad_scatter"))
# the module logic is checked on the reference op backend (the ops' own tests cover the kernels);
# the native run is added as soon as the C++ kernels are built
BACKENDS = ["reference",
            pytest.param("auto", marks=pytest.mark.skipif(not _NATIVE, reason="native CPU kernels not built"))]
# the network-level runs use the kernels users get (native once built)
FULL_BACKEND = "auto" if _NATIVE else "reference"


def _gi(B, L, dtype=torch.int64):
    return torch.arange(L).expand(B, L).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_mask", [True, False])
def test_ce_block_reference_equals_official_recipe(use_mask):
    B, lt, ls = 2, 64, 256
    blk = helpers.randomise(CEBlock(DIM, HEADS, qkv_bias=True, keep_ratio_search=0.7)).eval()
    x = torch.randn(B, lt + ls, DIM)
    m = ctr_point_mask(B, 8) if use_mask else None
    with fasttrack.use_backend("reference"), torch.no_grad():
        out, gi_t, gi_s, removed, attn = blk(x, _gi(B, lt), _gi(B, ls), None, m)
        # OSTrack's CEBlock, step by step, with its float global indices
        a_out, a = blk.attn(blk.norm1(x), None, True)
        x1 = x + a_out
        tok, keep, rem = R.official_candidate_elimination(a, x1, lt, 0.7, _gi(B, ls, torch.float32), m)
        exp = tok + blk.mlp(blk.norm2(tok))
    assert out.shape == (B, lt + 180, DIM)
    assert torch.equal(gi_s, keep.long()) and torch.equal(removed, rem.long())
    assert_close(out, exp)
    assert_close(attn, a)
    assert torch.equal(gi_t, _gi(B, lt))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 4])
def test_fused_ce_block_matches_reference(backend, B):
    lt, ls = 64, 256
    ref = helpers.randomise(CEBlock(DIM, HEADS, qkv_bias=True, keep_ratio_search=0.7)).eval()
    fused = FusedCEBlock.from_reference(ref).eval()
    x = torch.randn(B, lt + ls, DIM)
    with fasttrack.use_backend(backend), torch.no_grad():
        for m in (ctr_point_mask(B, 8), None):
            r = ref(x, _gi(B, lt), _gi(B, ls), None, m)
            f = fused(x, _gi(B, lt), _gi(B, ls), None, m)
            assert_close(f[0], r[0], scale=4)
            assert torch.equal(f[2], r[2]) and torch.equal(f[3], r[3])
            assert f[4] is None  # SDPA: no attention map unless asked
        fused.return_attention = True
        f = fused(x, _gi(B, lt), _gi(B, ls), None, ctr_point_mask(B, 8))
        r = ref(x, _gi(B, lt), _gi(B, ls), None, ctr_point_mask(B, 8))
        assert_close(f[4], r[4])
        assert torch.equal(f[2], r[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ce_block_bf16(backend):
    """bf16 runs the explicit attention core (faster than SDPA there) and scores its map; the
    GEMMs round differently from ATen's, so near-tied candidates may swap: the kept sets must
    agree almost everywhere and the tokens where they agree must match."""
    B, lt, ls = 2, 64, 256
    ref = helpers.randomise(CEBlock(DIM, HEADS, qkv_bias=True, keep_ratio_search=0.7)).eval().to(torch.bfloat16)
    fused = FusedCEBlock.from_reference(ref).eval()
    x = torch.randn(B, lt + ls, DIM, dtype=torch.bfloat16)
    with fasttrack.use_backend(backend), torch.no_grad():
        r = ref(x, _gi(B, lt), _gi(B, ls), None, None)
        f = fused(x, _gi(B, lt), _gi(B, ls), None, None)
    assert f[0].dtype == torch.bfloat16 and f[0].shape == r[0].shape and f[4] is None
    for b in range(B):
        common = set(f[2][b].tolist()) & set(r[2][b].tolist())
        assert len(common) >= 0.95 * r[2].shape[1]
        pos_f = {g: i for i, g in enumerate(f[2][b].tolist())}
        pos_r = {g: i for i, g in enumerate(r[2][b].tolist())}
        idx = sorted(common)
        tf = f[0][b, lt + torch.tensor([pos_f[g] for g in idx])].float()
        tr = r[0][b, lt + torch.tensor([pos_r[g] for g in idx])].float()
        assert_close(tf, tr, dtype=torch.bfloat16, scale=4)


def test_fused_ce_block_mask_and_keep_rate_rules():
    B, lt, ls = 2, 64, 256
    ref = helpers.randomise(CEBlock(DIM, HEADS, qkv_bias=True, keep_ratio_search=0.7)).eval()
    fused = FusedCEBlock.from_reference(ref).eval()
    x = torch.randn(B, lt + ls, DIM)
    mask = torch.zeros(B, lt + ls, dtype=torch.bool)
    mask[:, -10:] = True
    with fasttrack.use_backend("reference"), torch.no_grad():
        # an attention mask takes the explicit path (the map is returned) and matches the reference
        r = ref(x, _gi(B, lt), _gi(B, ls), mask, None)
        f = fused(x, _gi(B, lt), _gi(B, ls), mask, None)
        assert f[4] is not None
        assert_close(f[0], r[0], scale=4)
        assert torch.equal(f[2], r[2])
        # keep rate 1 at call time disables CE (OSTrack's rule); a block with ratio 1 never runs it
        for blk in (ref, fused):
            out, _, gi_s, removed, _ = blk(x, _gi(B, lt), _gi(B, ls), None, None, 1.0)
            assert out.shape[1] == lt + ls and removed is None and torch.equal(gi_s, _gi(B, ls))
        out, _, gi_s, removed, _ = fused(x, _gi(B, lt), _gi(B, ls), None, None, 0.5)
        assert out.shape[1] == lt + 128 and removed.shape == (B, 128)
        # float global indices (OSTrack's own backbone) come back as floats
        f = fused(x, _gi(B, lt, torch.float32), _gi(B, ls, torch.float32), None, None)
        assert f[2].dtype == torch.float32 and torch.equal(f[2].long(), ref(x, _gi(B, lt), _gi(B, ls))[2])


def test_ce_errors_name_the_argument():
    B = 2
    blk = CEBlock(64, 4, keep_ratio_search=0.7)
    x = torch.randn(B, 16 + 64, 64)
    bad = torch.zeros(B, 16, dtype=torch.bool)
    bad[0, 3] = True
    bad[1, 3:5] = True
    with pytest.raises(ValueError, match="ce_template_mask"):
        blk(x, _gi(B, 16), _gi(B, 64), None, bad)
    with pytest.raises(ValueError, match="ce_template_mask"):
        blk(x, _gi(B, 16), _gi(B, 64), None, torch.ones(B, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="global_index_search"):
        blk(x, _gi(B, 16), _gi(B, 64).int(), None, None)
    with pytest.raises(ValueError, match="template_feat_size"):
        ctr_point_mask(1, 9)
    assert torch.equal(ce_query_index(ctr_point_mask(2, 12), 2, 144, 10, "cpu"), torch.full((2, 1), 65 + 10))


# --------------------------------------------------------------------------------------------
# backbone / network
# --------------------------------------------------------------------------------------------
def _pair(config="vitb_256_mae_ce", depth=12):
    ref = helpers.randomise(build_ostrack(config, depth=depth)).eval()
    return ref, FusedOSTrack.from_reference(ref).eval()


def _check_outputs(o_f, o_r):
    assert_close(o_f["pred_boxes"], o_r["pred_boxes"], scale=10)
    assert_close(o_f["score_map"], o_r["score_map"], scale=10)
    assert_close(o_f["size_map"], o_r["size_map"], scale=10)
    assert_close(o_f["backbone_feat"], o_r["backbone_feat"], scale=20)
    assert len(o_f["removed_indexes_s"]) == len(o_r["removed_indexes_s"])
    for a, b in zip(o_f["removed_indexes_s"], o_r["removed_indexes_s"]):
        assert torch.equal(a, b)


def test_ostrack256_full_depth_b1():
    backend = FULL_BACKEND
    ref, fused = _pair()
    z, x = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256)
    m = ctr_point_mask(1, 8)
    with fasttrack.use_backend(backend), torch.no_grad():
        o_r, o_f = ref(z, x, ce_template_mask=m), fused(z, x, ce_template_mask=m)
    assert o_r["backbone_feat"].shape == (1, 64 + 256, DIM)
    assert o_r["pred_boxes"].shape == (1, 1, 4) and o_r["score_map"].shape == (1, 1, 16, 16)
    assert [r.shape[1] for r in o_r["removed_indexes_s"]] == [76, 54, 37]  # 256 -> 180 -> 126 -> 89
    _check_outputs(o_f, o_r)
    # eliminated search positions are exact zeros in both
    gone = torch.cat(o_r["removed_indexes_s"], 1)[0]
    assert (o_f["backbone_feat"][0, 64 + gone] == 0).all()


def test_ostrack256_reduced_depth_b4():
    backend = FULL_BACKEND  # both backends are compared block by block above
    ref, fused = _pair(depth=5)  # CE at 3, then one more block on the pruned tokens
    z, x = torch.randn(4, 3, 128, 128), torch.randn(4, 3, 256, 256)
    m = ctr_point_mask(4, 8)
    with fasttrack.use_backend(backend), torch.no_grad():
        _check_outputs(fused(z, x, ce_template_mask=m), ref(z, x, ce_template_mask=m))


def test_ostrack384_tokens():
    ref, fused = _pair("vitb_384_mae_ce", depth=4)
    z, x = torch.randn(1, 3, 192, 192), torch.randn(1, 3, 384, 384)
    with fasttrack.use_backend("reference"), torch.no_grad():
        m = ctr_point_mask(1, 12)
        o_r, o_f = ref(z, x, ce_template_mask=m), fused(z, x, ce_template_mask=m)
    assert o_r["backbone_feat"].shape == (1, 144 + 576, DIM)
    assert o_r["removed_indexes_s"][0].shape == (1, 576 - 404)
    _check_outputs(o_f, o_r)


def test_repad_equals_official_recipe():
    from fasttrack.nn.ce import official_repad
    kept = torch.randn(2, 5, 8)
    gi = torch.tensor([[4, 0, 7, 2, 9], [1, 3, 5, 7, 9]])
    rem = [torch.tensor([[1, 3], [0, 2]]), torch.tensor([[5, 6, 8], [4, 6, 8]])]
    exp = R.official_pad_scatter(kept, gi, torch.cat(rem, 1))
    assert torch.equal(official_repad(kept, gi, rem, 10), exp)
    assert torch.equal(fasttrack.pad_scatter(kept, gi, 10), exp)


def test_training_forward_backward_through_fused_network():
    # CE at block 3; narrow for time (the full-width blocks are compared in inference above)
    ref = helpers.randomise(build_ostrack(depth=4, embed_dim=128, num_heads=2, head_channels=64)).train()
    fused = FusedOSTrack.from_reference(ref).train()
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    m = ctr_point_mask(2, 8)
    with fasttrack.use_backend("reference"):
        o_r = ref(z, x, ce_template_mask=m)
        loss_r = o_r["pred_boxes"].sum() + o_r["score_map"].mean() + o_r["backbone_feat"].square().mean()
        loss_r.backward()
        g_r = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref.zero_grad()
        o_f = fused(z, x, ce_template_mask=m)
        loss_f = o_f["pred_boxes"].sum() + o_f["score_map"].mean() + o_f["backbone_feat"].square().mean()
        loss_f.backward()
        g_f = {n: p.grad.clone() for n, p in fused.named_parameters() if p.grad is not None}
    assert g_f.keys() == g_r.keys() and "backbone.blocks.3.mlp.fc1.weight" in g_f
    assert_close(loss_f, loss_r, scale=10)
    for n in g_r:
        assert_close(g_f[n], g_r[n], scale=200)  # long fp32 reductions through 4 blocks and the head


def test_image_size_error():
    ref = build_ostrack(depth=1)
    with pytest.raises(ValueError, match="px"):
        ref(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 224, 224))


# --------------------------------------------------------------------------------------------
# official key layout, strict loading
# --------------------------------------------------------------------------------------------
def official_ostrack_vitb_keys(template=128, search=256, depth=12, C=768, head_channels=256):
    """The ``net`` state dict of an OSTrack ViT-B CE checkpoint (``vit_base_patch16_224_ce`` after
    ``finetune_track``, CENTER head), as OSTrack's code creates it: {key: shape}."""
    keys = {"backbone.cls_token": (1, 1, C), "backbone.pos_embed": (1, 14 * 14 + 1, C),
            "backbone.patch_embed.proj.weight": (C, 3, 16, 16), "backbone.patch_embed.proj.bias": (C,),
            "backbone.norm.weight": (C,), "backbone.norm.bias": (C,),
            "backbone.pos_embed_z": (1, (template // 16) ** 2, C), "backbone.pos_embed_x": (1, (search // 16) ** 2, C)}
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        keys.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,), p + "attn.qkv.weight": (3 * C, C),
                     p + "attn.qkv.bias": (3 * C,), p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                     p + "norm2.weight": (C,), p + "norm2.bias": (C,), p + "mlp.fc1.weight": (4 * C, C),
                     p + "mlp.fc1.bias": (4 * C,), p + "mlp.fc2.weight": (C, 4 * C), p + "mlp.fc2.bias": (C,)})
    chans = [C, head_channels, head_channels // 2, head_channels // 4, head_channels // 8]
    for b, out in (("ctr", 1), ("offset", 2), ("size", 2)):
        for s in range(1, 5):
            p = f"box_head.conv{s}_{b}."
            cin, cout = chans[s - 1], chans[s]
            keys.update({p + "0.weight": (cout, cin, 3, 3), p + "0.bias": (cout,), p + "1.weight": (cout,),
                         p + "1.bias": (cout,), p + "1.running_mean": (cout,), p + "1.running_var": (cout,),
                         p + "1.num_batches_tracked": ()})
        keys.update({f"box_head.conv5_{b}.weight": (out, chans[4], 1, 1), f"box_head.conv5_{b}.bias": (out,)})
    return keys


@pytest.mark.parametrize("config,sizes", [("vitb_256_mae_ce", (128, 256)), ("vitb_384_mae_ce", (192, 384))])
def test_strict_load_of_official_key_layout(config, sizes):
    spec = official_ostrack_vitb_keys(*sizes)
    sd = {k: (torch.tensor(7) if shape == () else torch.empty(shape)) for k, shape in spec.items()}
    for fused in (False, True):
        with torch.device("meta"):  # ViT-B init is slow on a shared CPU; keys and shapes are what count
            net = build_ostrack(config, fused=fused)
            bb = (FusedVisionTransformerCE if fused else VisionTransformerCE)(*sizes)
        got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert got == spec
        net.load_state_dict(sd, strict=True, assign=True)
        assert net.backbone.blocks[5].attn.qkv.weight.data_ptr() == sd["backbone.blocks.5.attn.qkv.weight"].data_ptr()
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        bb.load_state_dict(backbone_sd, strict=True, assign=True)
    # and a real (materialised) reduced network loads its own official-layout dict strictly
    small = official_ostrack_vitb_keys(*sizes, depth=2)
    build_ostrack(config, depth=2).load_state_dict(
        {k: (torch.tensor(7) if s == () else torch.randn(s)) for k, s in small.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 4])
def test_fused_head_matches_reference(B):
    ref = helpers.randomise(CenterPredictor(DIM, 256, 16, 16)).eval()
    fused = FusedCenterPredictor.from_reference(ref).eval()
    x = torch.randn(B, DIM, 16, 16)
    with torch.no_grad():
        assert fused.uses_folded(x)
        r, f = ref(x), fused(x)
    for a, b in zip(f, r):
        assert_close(a, b, scale=20)
    # the strided channels-last view the fused network passes
    tok = torch.randn(B, 320, DIM)
    view = tok[:, -256:].transpose(1, 2).unflatten(2, (16, 16))
    with torch.no_grad():
        assert_close(fused(view)[1], ref(view.contiguous())[1], scale=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_head_packed_convolutions(dtype):
    """fp32 / bf16 run every stage on oneDNN-packed weights (`packable`), float64 on `F.conv2d`;
    both against the float64 reference, within the dtype's tolerance."""
    import copy
    from fasttrack.nn.linear import packable
    ref = helpers.randomise(CenterPredictor(DIM, 256, 16, 16)).eval()
    fused = FusedCenterPredictor.from_reference(copy.deepcopy(ref).to(dtype)).eval()
    x = torch.randn(3, DIM, 16, 16)
    with torch.no_grad():
        expected = ref.double()(x.double())
        out = fused(x.to(dtype))
    packed = [p is not None for *_, p in fused._folded_weights(dtype)]
    want = packable(x.to(dtype), torch.empty(1, dtype=dtype), None)
    assert packed == [want] * 5
    assert want == (dtype != torch.float64 and torch.backends.mkldnn.is_available())
    for a, b in zip(out, expected):
        assert_close(a.double(), b, dtype=dtype, scale=2)


def test_fused_head_dispatch_rule_and_cache():
    ref = helpers.randomise(CenterPredictor(64, 32, 8, 16)).eval()
    fused = FusedCenterPredictor.from_reference(ref).eval()
    x = torch.randn(2, 64, 8, 8)
    assert not fused.uses_folded(x)  # grad mode on, parameters need grad
    with torch.no_grad():
        assert fused.uses_folded(x)
        fused(x)
        ref.conv2_size[1].running_var.mul_(3.0)  # BN statistic changed in place: refold
        for a, b in zip(fused(x), ref(x)):
            assert_close(a, b, scale=20)
    fused.train()
    ref.train()
    with torch.no_grad():
        assert not fused.uses_folded(x)
    with pytest.raises(ValueError, match="x"):
        ref(torch.randn(1, 64, 9, 9))
    bad = CenterPredictor(64, 32, 8, 16)
    bad.conv3_ctr = nn.Conv2d(16, 8, 3)
    with pytest.raises(TypeError, match="conv3_ctr"):
        FusedCenterPredictor.from_reference(bad)
