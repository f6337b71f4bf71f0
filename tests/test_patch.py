"""fasttrack.patch_model on networks built from plain torch.nn modules with the official trackers'
structure (OSTrack-CE and a UTPTrack-S block), the report, include/exclude, and registration."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrack import reference as R
from fasttrack.nn.ostrack import FusedCEBlock, ctr_point_mask
from fasttrack.nn.utptrack import FusedUTPTrackSBlock
from fasttrack.patch import patch_model, recognizers, register_recognizer
from tests.tolerances import assert_close
from tests.official_standins import DropPath  # timm's, by name and attribute


# --------------------------------------------------------------------------------------------
# OSTrack, as its repository builds it (timm-style pieces, float linspace indices), in plain torch.nn
# --------------------------------------------------------------------------------------------
class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class OfficialAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, rpe=False):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.attn_drop = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)
        self.rpe = rpe

    def forward(self, x, mask=None, return_attention=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale)
        if mask is not None:
            attn = attn.masked_fill(mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        attn = self.attn_drop(attn.softmax(-1))
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
        return (x, attn) if return_attention else x


class OfficialCEBlock(nn.Module):
    def __init__(self, dim, num_heads, keep_ratio_search=1.0, drop_path=0.0, rpe=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAttention(dim, num_heads, rpe=rpe)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.keep_ratio_search = keep_ratio_search

    def forward(self, x, global_index_template, global_index_search, mask=None, ce_template_mask=None,
                keep_ratio_search=None):
        x_attn, attn = self.attn(self.norm1(x), mask, True)
        x = x + self.drop_path(x_attn)
        lens_t = global_index_template.shape[1]
        removed = None
        if self.keep_ratio_search < 1 and (keep_ratio_search is None or keep_ratio_search < 1):
            keep = self.keep_ratio_search if keep_ratio_search is None else keep_ratio_search
            x, global_index_search, removed = R.official_candidate_elimination(attn, x, lens_t, keep,
                                                                               global_index_search, ce_template_mask)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, global_index_template, global_index_search, removed, attn


def _conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class OfficialCenterHead(nn.Module):
    def __init__(self, inplanes, channel, feat_sz, stride=16):
        super().__init__()
        self.feat_sz, self.stride = feat_sz, stride
        for b, out in (("ctr", 1), ("offset", 2), ("size", 2)):
            setattr(self, f"conv1_{b}", _conv(inplanes, channel))
            setattr(self, f"conv2_{b}", _conv(channel, channel // 2))
            setattr(self, f"conv3_{b}", _conv(channel // 2, channel // 4))
            setattr(self, f"conv4_{b}", _conv(channel // 4, channel // 8))
            setattr(self, f"conv5_{b}", nn.Conv2d(channel // 8, out, 1))

    def branch(self, x, b):
        for s in range(1, 6):
            x = getattr(self, f"conv{s}_{b}")(x)
        return x

    def forward(self, x, gt_score_map=None):
        sig = lambda t: torch.clamp(t.sigmoid_(), 1e-4, 1 - 1e-4)  # noqa: E731
        ctr, size, offset = sig(self.branch(x, "ctr")), sig(self.branch(x, "size")), self.branch(x, "offset")
        _, idx = torch.max(ctr.flatten(1), dim=1, keepdim=True)
        iy, ix = idx // self.feat_sz, idx % self.feat_sz
        idx2 = idx.unsqueeze(1).expand(idx.shape[0], 2, 1)
        sz = size.flatten(2).gather(2, idx2)
        off = offset.flatten(2).gather(2, idx2).squeeze(-1)
        bbox = torch.cat([(ix.float() + off[:, :1]) / self.feat_sz, (iy.float() + off[:, 1:]) / self.feat_sz,
                          sz.squeeze(-1)], dim=1)
        return ctr, bbox, size, offset


class OfficialOSTrack(nn.Module):
    def __init__(self, dim=192, heads=3, depth=5, ce_loc=(3,)):
        super().__init__()
        self.backbone = nn.Module()
        bb = self.backbone
        bb.patch_embed = nn.Module()
        bb.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        bb.pos_embed_z = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        bb.pos_embed_x = nn.Parameter(torch.randn(1, 256, dim) * 0.02)
        bb.blocks = nn.Sequential(*[OfficialCEBlock(dim, heads, 0.7 if i in ce_loc else 1.0) for i in range(depth)])
        bb.norm = nn.LayerNorm(dim, eps=1e-6)
        self.ce_loc = ce_loc
        self.box_head = OfficialCenterHead(dim, 64, 16)
        with torch.no_grad():
            for n, p in self.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, z, x, ce_template_mask=None):
        bb = self.backbone
        B = x.shape[0]
        embed = lambda t: bb.patch_embed.proj(t).flatten(2).transpose(1, 2)  # noqa: E731
        t = torch.cat([embed(z) + bb.pos_embed_z, embed(x) + bb.pos_embed_x], dim=1)
        gi_t = torch.linspace(0, 63, 64).repeat(B, 1)
        gi_s = torch.linspace(0, 255, 256).repeat(B, 1)
        removed = []
        for i, blk in enumerate(bb.blocks):
            t, gi_t, gi_s, rem, _ = blk(t, gi_t, gi_s, None, ce_template_mask, None)
            if i in self.ce_loc:
                removed.append(rem)
        t = bb.norm(t)
        zt, xs = t[:, :64], t[:, 64:]
        if removed and removed[0] is not None:
            xs = R.official_pad_scatter(xs, gi_s, torch.cat(removed, 1))
        feat = torch.cat([zt, xs], 1)
        opt = feat[:, -256:].unsqueeze(-1).permute(0, 3, 2, 1).contiguous().view(B, -1, 16, 16)
        score, bbox, size, offset = self.box_head(opt)
        return {"pred_boxes": bbox.view(B, 1, 4), "score_map": score, "backbone_feat": feat, "removed": removed}


def test_patch_official_structure_ostrack():
    model = OfficialOSTrack().eval()
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    m = ctr_point_mask(2, 8)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(z, x, ce_template_mask=m)
    report = patch_model(model)
    swapped = {p: rec for p, rec, _, _ in report.swapped}
    assert swapped == {**{f"backbone.blocks.{i}": "ostrack.ce_block" for i in range(5)},
                       "box_head": "ostrack.center_head"}
    assert report.skipped == []
    assert isinstance(model.backbone.blocks[3], FusedCEBlock) and model.backbone.blocks[3].keep_ratio_search == 0.7
    assert "5 swapped" not in str(report) and "6 swapped" in str(report)
    # same state dict (shared parameters, same keys)
    sd_after = model.state_dict()
    assert sd_after.keys() == sd_before.keys() and all(torch.equal(sd_after[k], v) for k, v in sd_before.items())
    with torch.no_grad():
        after = model(z, x, ce_template_mask=m)
    assert_close(after["pred_boxes"], before["pred_boxes"], scale=10)
    assert_close(after["score_map"], before["score_map"], scale=10)
    assert_close(after["backbone_feat"], before["backbone_feat"], scale=20)
    for a, b in zip(after["removed"], before["removed"]):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    # idempotent: nothing left to swap
    again = patch_model(model)
    assert again.swapped == [] and again.skipped == []


def test_patch_training_backward_through_patched_model():
    model = OfficialOSTrack(dim=64, heads=2, depth=4).train()
    ref = OfficialOSTrack(dim=64, heads=2, depth=4).train()
    ref.load_state_dict(model.state_dict())
    patch_model(model)
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    outs = []
    for net in (ref, model):
        o = net(z, x, ce_template_mask=ctr_point_mask(2, 8))
        (o["pred_boxes"].sum() + o["backbone_feat"].square().mean()).backward()
        outs.append({n: p.grad for n, p in net.named_parameters()})
    assert {n for n, g in outs[0].items() if g is None} == {n for n, g in outs[1].items() if g is None}
    for n, g in outs[0].items():
        if g is not None:
            assert_close(outs[1][n], g, scale=200)


def test_include_exclude_and_refusals():
    model = OfficialOSTrack(dim=64, heads=2, depth=4).eval()
    model.backbone.blocks[1].attn.rpe = True  # relative position bias: the fused block cannot take it
    report = patch_model(model, exclude=["ostrack.center_head", "backbone.blocks.2"])
    swapped = [p for p, *_ in report.swapped]
    assert swapped == ["backbone.blocks.0", "backbone.blocks.3"]
    reasons = {p: why for p, _, why in report.skipped}
    assert "rpe" in reasons["backbone.blocks.1"]
    assert reasons["backbone.blocks.2"] == reasons["box_head"] == "excluded by include/exclude"
    assert "rpe" in str(report)

    model2 = OfficialOSTrack(dim=64, heads=2, depth=4).eval()
    report = patch_model(model2, include=["backbone.blocks.[01]"])
    assert [p for p, *_ in report.swapped] == ["backbone.blocks.0", "backbone.blocks.1"]
    with pytest.raises(TypeError, match="include"):
        patch_model(model2, include="ostrack.ce_block")
    with pytest.raises(TypeError, match="model"):
        patch_model("not a module")


def test_unrecognised_block_is_reported_and_registration():
    class OddBlock(nn.Module):  # has attn/mlp but a structure nobody recognises
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.mlp(self.attn(x))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = OddBlock()

        def forward(self, x):
            return self.odd(x)

    net = Wrapper()
    report = patch_model(net)
    assert report.swapped == [] and report.skipped[0][0] == "odd" and "no recogniser" in report.skipped[0][2]

    class FusedOdd(nn.Module):
        def __init__(self, ref):
            super().__init__()
            self.attn, self.mlp = ref.attn, ref.mlp

        def forward(self, x):
            return self.mlp(self.attn(x))

    names_before = [r.name for r in recognizers()]
    try:
        register_recognizer("test.odd", match=lambda m: type(m).__name__ == "OddBlock", build=FusedOdd,
                            before="vit.block")
        names = [r.name for r in recognizers()]
        assert names.index("test.odd") == names.index("vit.block") - 1
        report = patch_model(net)
        assert report.swapped == [("odd", "test.odd", "OddBlock", "FusedOdd")]
        with pytest.raises(ValueError, match="before"):
            register_recognizer("test.x", match=lambda m: False, build=FusedOdd, before="nope")
    finally:
        from fasttrack.nn import _recognizers as table
        table._TABLE[:] = [r for r in table._TABLE if r.name in names_before]
    assert [r.name for r in recognizers()] == names_before


# --------------------------------------------------------------------------------------------
# UTPTrack-S: a plain-nn block with Fast-iTPN's structure (subln attention, SwiGLU, layer scale)
# --------------------------------------------------------------------------------------------
class ItpnAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)
        self.relative_position_bias_table, self.rel_pos_bias = None, None

    def forward(self, x, rel_pos_bias=None, attn_mask=None, return_attention=False):
        B, N, C = x.shape
        h = lambda t: t.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)  # noqa: E731
        q = h(F.linear(x, self.q_proj.weight, self.q_bias)) * self.scale
        k, v = h(F.linear(x, self.k_proj.weight)), h(F.linear(x, self.v_proj.weight, self.v_bias))
        attn = (q.float() @ k.float().transpose(-2, -1)).softmax(-1).type_as(x)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        return (out, attn) if return_attention else out


class ItpnSwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.act = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.SiLU()
        self.ffn_ln, self.w3, self.drop = nn.LayerNorm(hidden), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x))))


class OfficialSBlock(nn.Module):
    def __init__(self, dim=128, heads=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ItpnAttention(dim, heads)
        self.drop_path, self.norm2, self.mlp = nn.Identity(), nn.LayerNorm(dim), ItpnSwiGLU(dim, 3 * dim)
        self.gamma_1, self.gamma_2 = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.rand(dim) + 0.5)
        self.keep_ratio_x, self.keep_ratio_dz, self.keep_ratio_sz = 0.7, 1.0, 1.0
        self.token_type_aware_pruing, self.multimodal_aware_pruning_target = None, "C"
        self.postnorm = self.deepnorm = False

    def forward(self, xz, rel_pos_bias=None, attn_mask=None, global_index_sz=None, global_index_dz=None,
                global_index_x=None, ce_template_mask=None, keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None,
                num_template=1, z_indicate_mask=None, task_index=None):
        y, attn = self.attn(self.norm1(xz), return_attention=True)
        xz = xz + self.gamma_1 * y
        lsz, ldz = global_index_sz.shape[1], global_index_dz.shape[1]
        lx = xz.shape[1] - 2 - lsz - ldz
        k = math.ceil(self.keep_ratio_x * lx)
        a = attn[:, :, 1 + lx:1 + lx + lsz, 1:1 + lx]
        B, H = a.shape[:2]
        a = a[ce_template_mask.unsqueeze(1).unsqueeze(-1).expand(-1, H, -1, lx)].view(B, H, -1, lx)
        idx = torch.sort(a.mean(2).mean(1), dim=1, descending=True, stable=True).indices
        top, non = idx[:, :k], idx[:, k:]
        xs = xz[:, 1:1 + lx].gather(1, top.unsqueeze(-1).expand(-1, -1, xz.shape[-1]))
        xz = torch.cat([xz[:, :1], xs, xz[:, 1 + lx:]], 1)
        xz = xz + self.gamma_2 * self.mlp(self.norm2(xz))
        return (xz, global_index_sz, global_index_dz, None, None, global_index_x.gather(1, top),
                global_index_x.gather(1, non), attn, ce_template_mask, z_indicate_mask)


def test_patch_official_structure_utptrack_s_block():
    net = nn.Sequential(OfficialSBlock()).eval()
    B, N = 2, 1 + 64 + 16 + 16 + 1
    x = torch.randn(B, N, 128)
    gsz = torch.arange(16).expand(B, 16).contiguous()
    gdz = torch.arange(16, 32).expand(B, 16).contiguous()
    gx = torch.arange(64).expand(B, 64).contiguous()
    box = torch.zeros(B, 16, dtype=torch.bool)
    box[:, 5] = True
    with torch.no_grad():
        before = net[0](x, None, None, gsz, gdz, gx, box, num_template=2)
    report = patch_model(net)
    assert report.swapped == [("0", "utptrack_s.block", "OfficialSBlock", "FusedUTPTrackSBlock")]
    assert isinstance(net[0], FusedUTPTrackSBlock)
    with torch.no_grad():
        after = net[0](x, None, None, gsz, gdz, gx, box, num_template=2)
    assert_close(after[0], before[0], scale=10)
    assert torch.equal(after[5], before[5]) and torch.equal(after[6], before[6])

    bad = nn.Sequential(OfficialSBlock())
    bad[0].attn.relative_position_bias_table = nn.Parameter(torch.zeros(3, 4))
    report = patch_model(bad)
    assert report.swapped == [] and "relative position bias" in report.skipped[0][2]


def test_every_family_recogniser_is_registered_in_a_fresh_process():
    """After a plain `import fasttrack`, patch_model knows all four families' structures."""
    import subprocess
    import sys
    code = ("import torch, fasttrack\n"
            "fasttrack.patch_model(torch.nn.Linear(2, 2))\n"
            "from fasttrack.patch import recognizers\n"
            "print(' '.join(r.name for r in recognizers()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    for prefix in ("ostrack.", "utptrack_o.", "utptrack_s.", "etctrack.", "abtrack.", "compresstracker."):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
