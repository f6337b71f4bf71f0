"""Official-code fidelity (issue 16), against stand-ins that follow the official interfaces
(tests/official_standins.py):

- `patch_model` never breaks a model: a block with an extra gate, a post-norm block, an attention
  with an extra norm, LayerScale, a scaled residual, a causal mask — not swapped, reason reported,
  outputs unchanged; timm's drop_path1/2 kept in training; ``example_inputs`` verification;
- UTPTrack-S fused blocks built from official SUTrack blocks, on every path (mask, attention map,
  bf16/fp16, autograd; CUDA through the device kernels);
- AVTrack: the official backbone's state dict loads strictly, the gate is kept, eval decides for the
  whole batch (per-sample only as an opt-in), patch_model swaps the backbone and refuses the
  non-SDPA attention;
- ToMe's clamp, OSTrack's CTR_POINT call, the head's contiguous NCHW input.
"""

import pytest
import torch
from torch import nn

import fasttrack
from fasttrack.nn.avtrack import AVTrackViT, FusedAVTrackViT
from fasttrack.nn.utptrack import FusedUTPTrackSBlock, UTPTrackSBlock
from tests import helpers
from tests import official_standins as O
from tests.tolerances import assert_close

DIM, HEADS = 64, 4


class Stack(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


def _randomised(m):
    return helpers.randomise(m).eval()


def _patched_keeps_outputs(block, x=None, **kw):
    """patch_model on a one-block model: (report, outputs before, outputs after)."""
    torch.manual_seed(0)
    net = Stack(_randomised(block))
    x = torch.randn(2, 24, DIM) if x is None else x
    keys = set(net.state_dict())
    with torch.no_grad():
        before = net(x)
        report = fasttrack.patch_model(net, **kw)
        after = net(x)
    assert set(net.state_dict()) == keys
    return report, before, after


# ----------------------------------------------------------------------------- patch_model safety
def test_plain_timm_block_is_swapped_and_agrees():
    report, before, after = _patched_keeps_outputs(O.TimmBlock(DIM, HEADS))
    assert [r for _, r, _, _ in report.swapped] == ["vit.block"]
    assert_close(after, before, scale=10)


@pytest.mark.parametrize("case", ["extra gate", "attn scale norm", "layer scale", "qk norm"])
def test_blocks_with_extra_members_are_not_swapped(case):
    class GatedBlock(O.TimmBlock):   # a hand-made block: an extra gate multiplies the output
        def __init__(self, dim, heads):
            super().__init__(dim, heads)
            self.gate = nn.Linear(dim, 1)

        def forward(self, x, attn_mask=None):
            return super().forward(x) * torch.sigmoid(self.gate(x))

    block, member = {
        "extra gate": (GatedBlock(DIM, HEADS), "gate.weight"),
        "attn scale norm": (O.TimmBlock(DIM, HEADS, scale_attn_norm=True), "attn.norm.weight"),
        "layer scale": (O.TimmBlock(DIM, HEADS, init_values=0.1), "ls1.gamma"),
        "qk norm": (O.TimmBlock(DIM, HEADS, qk_norm=True), "attn.q_norm.weight"),
    }[case]
    report, before, after = _patched_keeps_outputs(block)
    assert report.swapped == []
    (path, _, why), = report.skipped
    assert path == "blocks.0" and member in why, why
    assert torch.equal(after, before)


@pytest.mark.parametrize("case", ["post-norm", "scaled residual", "causal mask"])
def test_blocks_whose_forward_differs_are_not_swapped(case):
    class ScaledResidual(O.TimmBlock):
        def forward(self, x, attn_mask=None):
            x = x + 0.5 * self.attn(self.norm1(x))
            return x + 0.5 * self.mlp(self.norm2(x))

    class Causal(O.TimmBlock):
        def forward(self, x, attn_mask=None):
            n = x.shape[1]
            causal = torch.full((n, n), float("-inf"), device=x.device).triu(1)
            return super().forward(x, attn_mask=causal)

    block = {"post-norm": O.TimmResPostBlock(DIM, HEADS), "scaled residual": ScaledResidual(DIM, HEADS),
             "causal mask": Causal(DIM, HEADS)}[case]
    report, before, after = _patched_keeps_outputs(block)
    assert report.swapped == []
    assert "behaves differently on a probe input" in report.skipped[0][2], report
    assert torch.equal(after, before)


def test_timm_drop_path_survives_in_training():
    blk = O.TimmBlock(DIM, HEADS, drop_path=0.2)
    net = Stack(blk).train()
    report = fasttrack.patch_model(net)
    assert [r for _, r, _, _ in report.swapped] == ["vit.block"]
    fused = net.blocks[0]
    assert fused.training and fused.drop_path.drop_prob == 0.2
    x = torch.randn(64, 8, DIM)
    with torch.no_grad():   # stochastic depth in training (two draws differ), none in eval
        assert not torch.equal(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))
    uneven = O.TimmBlock(DIM, HEADS, drop_path=0.2)
    uneven.drop_path2 = O.DropPath(0.1)
    report = fasttrack.patch_model(Stack(uneven))
    assert report.swapped == [] and "different rates" in report.skipped[0][2]


def test_example_inputs_catch_what_the_probe_cannot():
    class LongSequencesDiffer(O.TimmBlock):   # agrees on the short probe, not on real inputs
        def forward(self, x, attn_mask=None):
            y = super().forward(x)
            return y * 1.5 if x.shape[1] > 32 else y

    x = torch.randn(2, 48, DIM)
    net = Stack(_randomised(LongSequencesDiffer(DIM, HEADS)))
    with torch.no_grad():
        before = net(x)
    report = fasttrack.patch_model(net, example_inputs=(x,))
    assert report.swapped == [] and "on the example inputs" in report.skipped[0][2]
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert [r for _, r, _, _ in fasttrack.patch_model(net).swapped] == ["vit.block"]   # the probe alone misses it


# ----------------------------------------------------------------------------------- UTPTrack-S
def _sutrack_pair(dtype=torch.float32):
    """An official SUTrack main block, UTPTrack-S's reference block loading its state strictly, and
    the fused block built from the official one (sharing its parameters). CE on the search tokens."""
    torch.manual_seed(0)
    official = _randomised(O.SUTrackBlock(DIM, HEADS))
    ref = UTPTrackSBlock(DIM, HEADS, mlp_ratio=3.0, qkv_bias=True, init_values=0.1,
                         norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), keep_ratio_x=0.7).eval()
    ref.mlp.ffn_ln = nn.LayerNorm(int(DIM * 3.0), eps=1e-6)
    ref.load_state_dict(official.state_dict(), strict=True)
    fused = FusedUTPTrackSBlock.from_reference(official).eval()
    fused.keep_ratio_x = 0.7
    return official.to(dtype), ref.to(dtype), fused


def _s_inputs(dtype, B=2, lx=12, lz=4):
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(B, 1 + lx + 2 * lz + 1, DIM, generator=g).to(dtype)
    gi = lambda s, n: torch.arange(s, s + n).expand(B, n).contiguous()  # noqa: E731
    return xz, dict(global_index_sz=gi(0, lz), global_index_dz=gi(lz, lz), global_index_x=gi(0, lx),
                    ce_template_mask="ctr_point" if lz in (49, 64) else None, num_template=2)


@pytest.mark.parametrize("kernel", helpers.kernels(triton=False))
@pytest.mark.parametrize("path", ["plain", "attn_mask", "return_attention", "bf16", "fp16", "autograd"])
def test_utptrack_s_fused_from_official_sutrack_block(kernel, path):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(path, torch.float32)
    official, ref, fused = _sutrack_pair(dtype)
    fused.return_attention = path == "return_attention"
    xz, kw = _s_inputs(dtype)
    if path == "attn_mask":   # Fast-iTPN's convention: True = the key takes part
        kw["attn_mask"] = torch.ones(2, xz.shape[1], dtype=torch.bool)
        kw["attn_mask"][1, -3:] = False
    dev = helpers.device_of(kernel)
    ref, fused = ref.to(dev), fused.to(dev)
    xz, kw = helpers.to_device((xz, kw), dev)
    if path == "autograd":
        xr, xf = xz.clone().requires_grad_(), xz.clone().requires_grad_()
        out_r, out_f = ref(xr, **kw), fused(xf, **kw)
        g = torch.randn_like(out_r[0])
        (out_r[0] * g).sum().backward()
        (out_f[0] * g).sum().backward()
        assert_close(xf.grad, xr.grad, scale=20)
        fused_params = dict(fused.named_parameters())
        for n, pr in ref.named_parameters():
            assert_close(fused_params[n].grad, pr.grad, scale=50)
    else:
        with torch.no_grad():
            out_r, out_f = ref(xz, **kw), fused(xz, **kw)
    scale = 20 if dtype == torch.float32 else 4
    assert_close(out_f[0].float(), out_r[0].float(), dtype=dtype, scale=scale)
    assert torch.equal(out_f[5], out_r[5]) and torch.equal(out_f[6], out_r[6])   # kept / removed search tokens
    if path in ("return_attention", "attn_mask"):
        assert out_f[7] is not None
        assert_close(out_f[7].float(), out_r[7].float(), dtype=dtype)
    else:
        assert out_f[7] is None


# ---------------------------------------------------------------------------------------- AVTrack
def _set_mixed_gate(model, i, z, x):
    """Gate i passes sample 0 and not sample 1 (its input's channel 0 separates them)."""
    seen = {}
    h = model.blocks[i].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model.blocks[i].active_score_module.bias.fill_(10.0)   # make sure block i is reached and runs
        model(z, x)
    h.remove()
    t0 = seen["x"][:, :, 0].double()
    d = t0[0] - t0[1]
    w = 20 * d / d.dot(d)
    with torch.no_grad():
        model.blocks[i].active_score_module.weight.copy_(w[None].float())
        model.blocks[i].active_score_module.bias.fill_(float(-w.dot((t0[0] + t0[1]) / 2)))


def _avtrack(depth=5, batch=2):
    torch.manual_seed(0)
    official = _randomised(O.AVTrackVisionTransformer(dim=DIM, depth=depth, num_heads=HEADS))
    g = torch.Generator().manual_seed(2)
    z, x = torch.randn(batch, 3, 128, 128, generator=g), torch.randn(batch, 3, 256, 256, generator=g)
    with torch.no_grad():   # gates: block 2 always, block 3 never, block 4 for sample 0 only
        official.blocks[2].active_score_module.weight.zero_()
        official.blocks[2].active_score_module.bias.fill_(5.0)
        official.blocks[3].active_score_module.weight.zero_()
        official.blocks[3].active_score_module.bias.fill_(-5.0)
    if batch > 1:
        _set_mixed_gate(official, 4, z, x)
    return official, z, x


def test_avtrack_state_loads_strictly_and_matches_the_official_backbone():
    official, z, x = _avtrack()
    ref = AVTrackViT(embed_dim=DIM, depth=5, num_heads=HEADS).eval()
    ref.load_state_dict(official.state_dict(), strict=True)
    with torch.no_grad():
        want, aux_w = official(z, x)
        got, aux_g = ref(z, x)
    assert_close(got, want, scale=20)
    assert len(aux_g["probs_active"]) == 3
    for a, b in zip(aux_g["probs_active"], aux_w["probs_active"]):
        assert torch.equal(a > 0.5, b > 0.5)
    assert (aux_w["probs_active"][2] > 0.5).squeeze(1).tolist() == [True, False]   # the mixed gate


@pytest.mark.parametrize("kernel", helpers.kernels(triton=False))
def test_avtrack_fused_decides_for_the_whole_batch_by_default(kernel):
    official, z, x = _avtrack()
    fused = FusedAVTrackViT.from_reference(official).eval()
    dev = helpers.device_of(kernel)
    official, fused = official.to(dev), fused.to(dev)
    z, x = z.to(dev), x.to(dev)
    with torch.no_grad():
        want, aux_w = official(z, x)
        fused.reset_counters()
        got, aux_g = fused(z, x)
    assert_close(got, want, scale=20)
    for a, b in zip(aux_g["probs_active"], aux_w["probs_active"]):
        assert torch.equal(a > 0.5, b > 0.5)
    if dev == "cpu":   # blocks 0, 1, 2 and 4 run on both samples, block 3 is skipped
        assert fused.samples_run == 8


def test_avtrack_per_sample_opt_in():
    official, z, x = _avtrack()
    fused = FusedAVTrackViT.from_reference(official, per_sample=True).eval()
    with torch.no_grad():
        fused.reset_counters()
        got, _ = fused(z, x)
        assert fused.samples_run == 2 + 2 + 2 + 1   # block 4 on sample 0 only
        # sample 0 (block 4 runs) equals the official output; sample 1 differs (the official code
        # ran block 4 on it too, because sample 0 passed)
        want, _ = official(z, x)
        assert_close(got[0], want[0], scale=20)
        assert not torch.allclose(got[1], want[1], atol=1e-3)
        alone, _ = official(z[1:], x[1:])   # at batch 1 the decisions are the sample's own
        assert_close(got[1], alone[0], scale=20)


def test_avtrack_patch_model_swaps_the_backbone_and_refuses_the_quirk():
    official, z, x = _avtrack()
    net = nn.Module()
    net.backbone = official
    with torch.no_grad():
        before, _ = official(z, x)
    report = fasttrack.patch_model(net)
    assert [r for _, r, _, _ in report.swapped] == ["avtrack.backbone"]
    assert isinstance(net.backbone, FusedAVTrackViT)
    with torch.no_grad():
        after, _ = net.backbone(z, x)
    assert_close(after, before, scale=20)

    quirky = O.AVTrackVisionTransformer(dim=DIM, depth=3, num_heads=HEADS, quirk="avtrack")
    for b in quirky.blocks:
        b.attn.fused_attn = False     # timm without SDPA: AVTrack's 0.1 * attn**2 path
    wrapper = nn.Module()
    wrapper.backbone = quirky
    report = fasttrack.patch_model(wrapper)
    assert report.swapped == []
    assert all("fused_attn" in why for _, _, why in report.skipped), report


# ------------------------------------------------------------------------------- ToMe, OSTrack
def test_bipartite_merge_clamps_r_like_tome():
    from tests.test_merge_tokens import tome_bipartite
    x = torch.randn(2, 21, 16)
    got, size = fasttrack.bipartite_merge(x, 50)
    want, wsize = tome_bipartite(x, 10)     # ToMe: r = min(r, (t - protected) // 2)
    assert_close(got, want)
    assert torch.equal(size, wsize)


def test_ostrack_ctr_point_is_the_official_tracker_call():
    from fasttrack import zoo
    from fasttrack.nn.ce import ctr_point_mask
    case = zoo.build("ostrack", 2, torch.float32, depth=4)
    z, x, _ = case.inputs
    official_mask = ctr_point_mask(2, 8)   # generate_mask_cond(CTR_POINT): True at row 3, col 3 = 27
    assert official_mask.nonzero()[:, 1].tolist() == [27, 27]
    with torch.no_grad():
        for net in (case.reference, case.fused):
            a = net(z, x, ce_template_mask=official_mask)
            b = net(z, x, ce_template_mask="ctr_point")
            c = net.track(x, template=z, ce_template_mask="ctr_point")
            for k in ("pred_boxes", "backbone_feat"):
                assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_reference_head_gets_the_official_contiguous_nchw():
    """OSTrack's forward_head copies the search tokens to a contiguous NCHW map: at B > 1 a
    strided view would pick another convolution algorithm (~3e-6 apart)."""
    from fasttrack import zoo
    case = zoo.build("ostrack", 3, torch.float32, depth=2)
    net = case.reference
    feat = torch.randn(3, 64 + 256, 768)
    opt = feat[:, -256:].unsqueeze(-1).permute(0, 3, 2, 1).contiguous().view(3, -1, 16, 16)   # the official code
    with torch.no_grad():
        want = net.box_head(opt)
        got = net.forward_head(feat)
    assert torch.equal(got["score_map"], want[0]) and torch.equal(got["pred_boxes"].view(3, 4), want[1])
