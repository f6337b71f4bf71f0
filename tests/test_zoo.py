"""The tracker zoo (`fasttrack.zoo`) and the UTPTrack-O whole network: every family builds a
(reference, fused) pair whose outputs agree; UTPTrack-O full network parity at B=1 and B=4, key
layout and error messages."""
import pytest
import torch

import fasttrack
from fasttrack import zoo
from fasttrack.nn.utptrack import FusedUTPTrackO, UTPTrackO, build_utptrack_o
from fasttrack.ops._registry import serving_kernel
from tests.tolerances import assert_close
from tests import helpers

_NATIVE = all(not serving_kernel(op, "cpu").startswith("none")
              for op in ("topk_select", "topk_select_qk", "pad_scatter"))
BACKEND = "auto" if _NATIVE else "reference"


def _pair(depth=12):
    torch.manual_seed(0)
    ref = helpers.randomise(build_utptrack_o(depth=depth)).eval()
    return ref, FusedUTPTrackO.from_reference(ref).eval()


def _check(o_f, o_r, feat_scale=20):
    for k in ("kept_indexes", "removed_indexes_s"):
        assert len(o_f[k]) == len(o_r[k])
        for a, b in zip(o_f[k], o_r[k]):
            assert a.dtype == torch.int64 and torch.equal(a, b), k
    assert_close(o_f["backbone_feat"], o_r["backbone_feat"], scale=feat_scale)
    assert_close(o_f["pred_boxes"], o_r["pred_boxes"], scale=10)
    assert_close(o_f["score_map"], o_r["score_map"], scale=10)


@pytest.mark.parametrize("B", [1, 4])
def test_utptrack_o_network_matches_reference(B):
    ref, fused = _pair()
    inputs = ref.example_inputs(B, generator=torch.Generator().manual_seed(B))
    with fasttrack.use_backend(BACKEND), torch.no_grad():
        o_r, o_f = ref(*inputs), fused(*inputs)
    # x 256 -> 180 -> 126 -> 89 (CE 3/6/9), each template 64 -> 45 -> 32 -> 23 (DTE/STE 4/7/10)
    assert [t.shape[1] for t in o_r["kept_indexes"]] == [89, 23, 23]
    assert [t.shape[1] for t in o_r["removed_indexes_s"]] == [76, 54, 37]
    assert o_r["backbone_feat"].shape == (B, 256 + 46, 768) and o_r["pred_boxes"].shape == (B, 1, 4)
    _check(o_f, o_r)
    gone = torch.cat(o_r["removed_indexes_s"], 1)
    for b in range(B):
        assert (o_f["backbone_feat"][b, gone[b]] == 0).all()  # eliminated search positions are zeros
    # the template centre (ce_template_mask) survives STE, with the static indices in 0..63
    assert (o_r["kept_indexes"][1] == 27).any(1).all()
    assert (o_r["kept_indexes"][2] >= 64).all()


def test_utptrack_o_network_bf16():
    ref, fused = _pair(depth=4)  # CE at 3 only: bf16 rounding can flip near-tied ranks further on
    ref, fused = ref.to(torch.bfloat16), FusedUTPTrackO.from_reference(ref.to(torch.bfloat16)).eval()
    inputs = ref.example_inputs(1, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with fasttrack.use_backend(BACKEND), torch.no_grad():
        o_r, o_f = ref(*inputs), fused(*inputs)
    assert o_f["backbone_feat"].dtype == torch.bfloat16
    # the kept search tokens as sets (one near-tie flipped by bf16 rounding moves one element)
    agree = torch.isin(o_f["kept_indexes"][0], o_r["kept_indexes"][0]).float().mean()
    assert agree >= 0.95
    torch.testing.assert_close(o_f["pred_boxes"].float(), o_r["pred_boxes"].float(), atol=0.05, rtol=0)


def test_utptrack_o_keys_shared_and_official_layout():
    ref, fused = _pair(depth=2)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    keys = set(ref.state_dict())
    for k in ("backbone.cls_token", "backbone.pos_embed", "backbone.pos_embed_z", "backbone.pos_embed_x",
              "backbone.patch_embed.proj.weight", "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.bias",
              "backbone.norm.weight", "box_head.conv1_ctr.0.weight", "box_head.conv5_size.weight"):
        assert k in keys, k
    fused_params = dict(fused.named_parameters())
    for n, p in ref.named_parameters():
        assert fused_params[n] is p, n  # shared, not copied
    fresh = build_utptrack_o(depth=2)
    fresh.load_state_dict(ref.state_dict(), strict=True)


def test_utptrack_o_errors_name_the_argument():
    ref, _ = _pair(depth=1)
    z, dz, x, m = ref.example_inputs(1)
    with pytest.raises(ValueError, match="`search`"):
        ref(z, dz, torch.randn(1, 3, 224, 224), m)
    with pytest.raises(ValueError, match="`dynamic_template`"):
        ref(z, torch.randn(1, 3, 64, 64), x, m)
    with pytest.raises(ValueError, match="feat_sz"):
        UTPTrackO(ref.backbone, build_utptrack_o(depth=1, search_size=384).box_head)


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_zoo_pairs_agree(family):
    case = zoo.build(family, 1, depth=None if family != "ostrack-384" else 4)
    if family != "abtrack":  # ABTrack: masked-dense reference vs pruned fused keys (fasttrack.nn.abtrack doc)
        assert case.reference.state_dict().keys() == case.fused.state_dict().keys()
    with fasttrack.use_backend(BACKEND), torch.no_grad():
        res = case.parity(case.reference(*case.inputs), case.fused(*case.inputs))
    assert res["feature_max_abs"] < 1e-3, res
    # kept sets identical (the parity rule); their order within a block's output may differ where
    # two fp32 scores tie to rounding — the next blocks' attention does not depend on that order, and
    # the features (re-padded to their positions) are compared above
    assert res["index_agreement"] in (None, 1.0), res
    assert res["box_max_abs"] is None or res["box_max_abs"] < 1e-4, res


def test_abtrack_half_the_batch_bypasses():
    case = zoo.build("abtrack", 8, depth=6)
    with fasttrack.use_backend(BACKEND), torch.no_grad():
        case.fused.reset_counters()
        o_r, o_f = case.reference(*case.inputs), case.fused(*case.inputs)
        o_all = case.extras["fused-all"](*case.inputs)
    skipped = o_r[1]["skipped"]
    assert skipped[:, 4].sum() == 4 and not skipped[:, 5].any() and not skipped[:, :4].any()
    assert torch.equal(o_f[1]["skipped"], skipped) and torch.equal(o_all[1]["skipped"], skipped)
    assert case.fused.blocks[4].samples_run == 4
    assert_close(o_f[0], o_r[0], scale=100)
    assert_close(o_all[0], o_r[0], scale=100)
    assert case.extras["dense"](*case.inputs)[0].shape == o_r[0].shape


def test_zoo_unknown_family():
    with pytest.raises(ValueError, match="`family`"):
        zoo.build("nope")
