"""CompressTracker family: official key layout and strict loading, student initialisation, the
replacement sampler and schedule against the official rule, reference vs fused parity, training."""
import math

import pytest
import torch

from fasttrack.nn.compresstracker import (
    STAGE_COUNTS, CompressTracker, CompressTrackerBackbone, FusedCompressTracker, FusedCompressTrackerBackbone,
    ReplacementTraining, backbone_state, build_compresstracker, expected_net_keys, feature_mimic_loss,
    replacement_probability, sample_replacement, student_init_blocks, student_state_from_teacher,
)
from tests.tolerances import assert_close

C = 768
SMALL = dict(embed_dim=64, num_heads=4)   # real structure (12 teacher blocks, N stages), narrow width


def official_block_shapes(prefix, c=C):
    """timm/OSTrack Block parameters (vit_compress.py::Block, Attention, timm Mlp)."""
    return {f"{prefix}.norm1.weight": (c,), f"{prefix}.norm1.bias": (c,),
            f"{prefix}.attn.qkv.weight": (3 * c, c), f"{prefix}.attn.qkv.bias": (3 * c,),
            f"{prefix}.attn.proj.weight": (c, c), f"{prefix}.attn.proj.bias": (c,),
            f"{prefix}.norm2.weight": (c,), f"{prefix}.norm2.bias": (c,),
            f"{prefix}.mlp.fc1.weight": (4 * c, c), f"{prefix}.mlp.fc1.bias": (4 * c,),
            f"{prefix}.mlp.fc2.weight": (c, 4 * c), f"{prefix}.mlp.fc2.bias": (c,)}


def official_backbone_shapes(num_stages, layout="student", c=C):
    """The official VisionTransformer (vit_compress_test.py / vit_compress.py) after finetune_track at
    128/256 px: embeddings, [blocks], [distill_blocks], norm."""
    shapes = {"cls_token": (1, 1, c), "pos_embed": (1, 197, c), "pos_embed_z": (1, 64, c),
              "pos_embed_x": (1, 256, c), "patch_embed.proj.weight": (c, 3, 16, 16), "patch_embed.proj.bias": (c,),
              "norm.weight": (c,), "norm.bias": (c,)}
    if layout in ("train", "teacher"):
        for i in range(12):
            shapes.update(official_block_shapes(f"blocks.{i}", c))
    if layout in ("train", "student"):
        for j in range(num_stages):
            shapes.update(official_block_shapes(f"distill_blocks.{j}", c))
    return shapes


def official_center_head_shapes(inplanes=C, channel=256):
    """OSTrack lib/models/layers/head.py::CenterPredictor (conv() = Conv2d, BatchNorm2d, ReLU)."""
    shapes, chans = {}, [inplanes, channel, channel // 2, channel // 4, channel // 8]
    for b, out in (("ctr", 1), ("offset", 2), ("size", 2)):
        for s in range(1, 5):
            cin, cout = chans[s - 1], chans[s]
            shapes.update({f"conv{s}_{b}.0.weight": (cout, cin, 3, 3), f"conv{s}_{b}.0.bias": (cout,),
                           f"conv{s}_{b}.1.weight": (cout,), f"conv{s}_{b}.1.bias": (cout,),
                           f"conv{s}_{b}.1.running_mean": (cout,), f"conv{s}_{b}.1.running_var": (cout,),
                           f"conv{s}_{b}.1.num_batches_tracked": ()})
        shapes.update({f"conv5_{b}.weight": (out, chans[4], 1, 1), f"conv5_{b}.bias": (out,)})
    return shapes


def random_state(shapes, gen):
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s, generator=gen) + 0.5
        else:
            sd[k] = torch.randn(s, generator=gen) * 0.02
    return sd


# --------------------------------------------------------------------------------------------
# Key layout and loading
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", STAGE_COUNTS)
@pytest.mark.parametrize("layout", ["student", "train", "teacher"])
def test_key_layout_loads_strict(n, layout):
    shapes = official_backbone_shapes(n, layout)
    assert sorted(CompressTrackerBackbone.expected_keys(n, layout)) == sorted(shapes)
    with torch.device("meta"):   # the strict key/shape check is the point; no init cost
        m = CompressTrackerBackbone(n, layout=layout)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    m.load_state_dict(sd, strict=True, assign=True)
    bad = dict(sd)
    bad.pop("pos_embed_x")
    with pytest.raises(RuntimeError, match="pos_embed_x"):
        m.load_state_dict(bad, strict=True, assign=True)


def test_released_checkpoint_loads_and_runs():
    """A `net` dict with the released key names (student backbone + CENTER head) loads strictly
    into the network and its backbone part into a bare backbone; both paths give the same output."""
    gen = torch.Generator().manual_seed(1)
    shapes = {**{"backbone." + k: s for k, s in official_backbone_shapes(4).items()},
              **{"box_head." + k: s for k, s in official_center_head_shapes().items()}}
    assert sorted(expected_net_keys(4)) == sorted(shapes)
    net_state = random_state(shapes, gen)
    with torch.device("meta"):   # no init: every tensor comes from the checkpoint
        net, bb = build_compresstracker(4).eval(), CompressTrackerBackbone(4).eval()
    net.load_state_dict(net_state, strict=True, assign=True)
    bb.load_state_dict(backbone_state({"module." + k: v for k, v in net_state.items()}), strict=True, assign=True)
    z, x = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = net(z, x)
        feats, aux = bb(z, x)
    assert out["pred_boxes"].shape == (1, 1, 4) and aux == {"attn": None}
    torch.testing.assert_close(out["backbone_feat"], feats, rtol=0, atol=0)


@pytest.mark.parametrize("n", STAGE_COUNTS)
def test_student_initialisation_from_teacher(n):
    ratio = 12 // n
    official = list(range(-1, 12, ratio))[1::]          # compresstracker.py: distill_block_maps
    assert student_init_blocks(n) == official == [(j + 1) * ratio - 1 for j in range(n)]
    teacher = CompressTrackerBackbone(n, layout="teacher", **SMALL)
    state = student_state_from_teacher(teacher.state_dict(), n)
    train = CompressTrackerBackbone(n, layout="train", **SMALL)
    train.load_state_dict(state, strict=True)
    for j, i in enumerate(official):
        for k, v in train.distill_blocks[j].state_dict().items():
            torch.testing.assert_close(v, teacher.blocks[i].state_dict()[k], rtol=0, atol=0)
    other = CompressTrackerBackbone(n, layout="train", **SMALL)
    other.blocks.load_state_dict(teacher.blocks.state_dict())
    other.init_students_from_teacher()
    for a, b in zip(other.distill_blocks.parameters(), train.distill_blocks.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Replacement rule and schedule
# --------------------------------------------------------------------------------------------
def official_count_distribution(n, p):
    """P(number of replaced stages = k), from vit_compress.py::forward_features: p < 0.5 → exactly
    one; else Binomial(n, p), with the all-kept outcome turned into exactly one."""
    if p < 0.5:
        return {1: 1.0}
    dist = {k: math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(1, n + 1)}
    dist[1] = dist.get(1, 0.0) + (1 - p) ** n
    return dist


@pytest.mark.parametrize("p", [0.5, 1.0, 0.3])
@pytest.mark.parametrize("n", [4, 2])
def test_replacement_sampler_statistics(n, p):
    draws = 10_000
    gen = torch.Generator().manual_seed(123)
    samples = torch.tensor([sample_replacement(n, p, gen) for _ in range(draws)])
    counts = samples.sum(1)
    want = official_count_distribution(n, p)
    assert set(counts.unique().tolist()) <= set(want)
    for k in range(0, n + 1):
        freq = (counts == k).float().mean().item()
        exp = want.get(k, 0.0)
        sigma = math.sqrt(exp * (1 - exp) / draws)
        assert abs(freq - exp) <= 4.5 * sigma + 1e-9, (k, freq, exp)
    # every stage equally likely to be replaced: P = sum_k P(k)·k/n by symmetry
    marginal = sum(k * q for k, q in want.items()) / n
    for j in range(n):
        freq = samples[:, j].float().mean().item()
        assert abs(freq - marginal) <= 4.5 * math.sqrt(marginal * (1 - marginal) / draws) + 1e-9


def test_replacement_schedule_matches_official():
    def official(epoch, max_epoch):   # CompressTrackerActor.set_bernoulli
        warm = end = max_epoch // 10
        if (epoch - 1) > warm and (epoch - 1) < (max_epoch - end):
            return (1.0 - 0.5) * (epoch - warm) / (max_epoch - warm - end) + 0.5
        if (epoch - 1) >= (max_epoch - end):
            return 1.0
        return 0.5

    for max_epoch in (500, 300, 37):
        ps = [replacement_probability(e, max_epoch) for e in range(1, max_epoch + 1)]
        assert ps == [official(e, max_epoch) for e in range(1, max_epoch + 1)]
        tenth = max_epoch // 10
        assert all(p == 0.5 for p in ps[:tenth]) and all(p == 1.0 for p in ps[max_epoch - tenth:])
        assert all(a <= b for a, b in zip(ps, ps[1:])) and all(0.5 <= p <= 1.0 for p in ps)
    with pytest.raises(ValueError, match="epoch"):
        replacement_probability(0, 500)
    with pytest.raises(ValueError, match="`p`"):
        sample_replacement(4, 0.0)


# --------------------------------------------------------------------------------------------
# Parity, reference vs fused
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
def test_network_parity_real_config(batch):
    """CompressTracker-4 at the released config (ViT-B/16, 128/256 px): features and boxes."""
    torch.manual_seed(0)
    ref = build_compresstracker(4).eval()
    fused = FusedCompressTracker.from_reference(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), ref.parameters()))
    z, x = torch.randn(batch, 3, 128, 128), torch.randn(batch, 3, 256, 256)
    with torch.no_grad():
        a, b = ref(z, x), fused(z, x)
    assert_close(b["backbone_feat"], a["backbone_feat"], scale=10)
    assert_close(b["score_map"], a["score_map"], scale=10)
    assert_close(b["pred_boxes"], a["pred_boxes"], scale=10)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_backbone_parity_stage_counts(n):
    torch.manual_seed(n)
    ref = CompressTrackerBackbone(n, layout="train", **SMALL).eval()
    fused = FusedCompressTrackerBackbone.from_reference(ref)
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    replaced = [j % 2 == 0 for j in range(n)]
    with torch.no_grad():
        a, sa = ref.forward_plan(z, x, replaced, return_stages=True)
        b, sb = fused.forward_plan(z, x, replaced, return_stages=True)
        assert_close(fused(z, x)[0], ref(z, x)[0])
    assert len(sa) == len(sb) == n
    assert_close(b, a)
    for u, v in zip(sb, sa):
        assert_close(u, v)


def test_stage_plan_follows_official_order():
    m = CompressTrackerBackbone(4, layout="train", **SMALL)
    plan = m.stage_plan([False, True, False, True])
    names = [(blk is m.distill_blocks[1], blk is m.distill_blocks[3], ends) for blk, ends in plan]
    expect = [m.blocks[0], m.blocks[1], m.blocks[2], m.distill_blocks[1], m.blocks[6], m.blocks[7], m.blocks[8],
              m.distill_blocks[3]]
    assert [blk for blk, _ in plan] == expect
    assert [ends for _, ends in plan] == [False, False, True, True, False, False, True, True]
    assert names[3][0] and names[7][1]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def test_replacement_training_forward_backward_fused_matches_reference():
    torch.manual_seed(0)
    teacher = CompressTrackerBackbone(4, layout="teacher", **SMALL)
    ref = CompressTrackerBackbone(4, layout="train", drop_path_rate=0.0, **SMALL)
    ref.load_state_dict(student_state_from_teacher(teacher.state_dict(), 4))
    fused = FusedCompressTrackerBackbone.from_reference(ref)
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    grads = []
    for bb in (ref, fused):
        wrapper = ReplacementTraining(bb, teacher, p=0.5).train()
        out = wrapper(z, x, replaced=[True, False, False, True])
        assert out["replaced"] == [True, False, False, True] and len(out["stage_features"]) == 4
        loss = feature_mimic_loss(out["stage_features"], out["teacher_stage_features"], bb.lens_x) \
            + out["features"].square().mean()
        for p in ref.parameters():
            p.grad = None
        loss.backward()
        grads.append({k: None if p.grad is None else p.grad.clone() for k, p in ref.named_parameters()})
    g_ref, g_fused = grads
    assert all(g_ref[f"blocks.{i}.attn.qkv.weight"] is None for i in range(12))   # frozen teacher copy
    assert g_ref["distill_blocks.0.mlp.fc1.weight"] is not None and g_ref["distill_blocks.1.attn.qkv.weight"] is None
    for k, g in g_ref.items():
        if g is None:
            assert g_fused[k] is None, k
        else:
            assert_close(g_fused[k], g, scale=10)
    # ref's frozen blocks are the teacher's: with no stage replaced both sides agree exactly
    wrapper = ReplacementTraining(ref, teacher).train()
    out = wrapper(z, x, replaced=[False] * 4)
    assert feature_mimic_loss(out["stage_features"], out["teacher_stage_features"], ref.lens_x).item() < 1e-10
    wrapper.eval()
    assert set(wrapper(z, x)) == {"features"}
    assert wrapper.set_epoch(500, 500) == 1.0 and wrapper.p == 1.0


def test_training_draws_a_replacement_each_step():
    torch.manual_seed(0)
    bb = FusedCompressTrackerBackbone(2, layout="train", **SMALL)
    wrapper = ReplacementTraining(bb, p=1.0).train()
    out = wrapper(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256))
    assert out["replaced"] == [True, True]
    assert all(not p.requires_grad for p in bb.blocks.parameters())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="num_stages"):
        CompressTrackerBackbone(5)
    with pytest.raises(ValueError, match="layout"):
        CompressTrackerBackbone(4, layout="both")
    m = CompressTrackerBackbone(2, **SMALL)
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="`z`"):
        m(torch.randn(1, 128, 128), torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match="ce_template_mask"):
        m(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256),
          ce_template_mask=torch.ones(1, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_training"):
        m(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256), is_training="train")
    with pytest.raises(ValueError, match="teacher blocks"):
        m.forward_plan(torch.randn(1, 3, 128, 128), torch.randn(1, 3, 256, 256), [True, False])
    with pytest.raises(ValueError, match="replaced"):
        m.stage_plan([True])
    with pytest.raises(ValueError, match="backbone"):
        ReplacementTraining(m)
    with pytest.raises(TypeError, match="ref_module"):
        FusedCompressTrackerBackbone.from_reference(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backbone"):
        CompressTracker(torch.nn.Linear(2, 2), None)


# --------------------------------------------------------------------------------------------
# patch_model on a network with the official structure (plain torch.nn)
# --------------------------------------------------------------------------------------------
class _OfficialAttention(torch.nn.Module):
    """vit_compress.py::Attention (restated): explicit softmax; returns the pre-softmax map."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn_drop = torch.nn.Dropout(0.0)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x, return_attention=False):
        B, N, Cx = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, Cx // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        out = self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, Cx))
        return (out, logits) if return_attention else out


class _OfficialMlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim)
        self.drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _OfficialBlock(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = _OfficialAttention(dim, num_heads)
        self.drop_path = torch.nn.Identity()
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _OfficialMlp(dim, 4 * dim)

    def forward(self, x, return_attention=False):
        feat, attn = self.attn(self.norm1(x), True)
        x = x + self.drop_path(feat)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


class _OfficialPatchEmbed(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, 16, 16)
        self.norm = torch.nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class _OfficialBackbone(torch.nn.Module):
    """vit_compress_test.py::VisionTransformer after finetune_track, inference path."""

    def __init__(self, n, dim, heads):
        super().__init__()
        self.patch_embed = _OfficialPatchEmbed(dim)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 197, dim) * 0.02)
        self.pos_drop = torch.nn.Dropout(0.0)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.depth, self.distill_layers, self.distill_ratio = 12, n, 12 // n
        self.distill_blocks = torch.nn.Sequential(*[_OfficialBlock(dim, heads) for _ in range(n)])
        self.cat_mode, self.add_cls_token, self.add_sep_seg = "direct", False, False
        self.pos_embed_z = torch.nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.pos_embed_x = torch.nn.Parameter(torch.randn(1, 256, dim) * 0.02)

    def set_bernoulli(self, p):
        self.bernoulli_prob = p

    def forward(self, z, x, is_training=False, **kwargs):
        x = self.patch_embed(x)
        z = self.patch_embed(z)
        z += self.pos_embed_z
        x += self.pos_embed_x
        x = self.pos_drop(torch.cat((z, x), dim=1))
        for blk in self.distill_blocks:
            x, _ = blk(x, return_attention=True)
        return self.norm(x), {"attn": None}


class _OfficialNet(torch.nn.Module):
    """compresstracker_test.py::CompressTrackerTest with the CENTER head."""

    def __init__(self, n, dim=C, heads=12):
        super().__init__()
        from fasttrack.nn.head import CenterPredictor
        self.backbone = _OfficialBackbone(n, dim, heads)
        self.box_head = CenterPredictor(inplanes=dim, channel=256, feat_sz=16, stride=16)

    def forward(self, template, search, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False,
                is_training="test"):
        x, aux = self.backbone(z=template, x=search, ce_template_mask=ce_template_mask, ce_keep_rate=ce_keep_rate,
                               return_last_attn=return_last_attn, is_training=is_training)
        opt = x[:, -256:].unsqueeze(-1).permute((0, 3, 2, 1)).contiguous()
        score_map, bbox, size_map, offset_map = self.box_head(opt.view(-1, x.shape[-1], 16, 16), None)
        return {"pred_boxes": bbox.view(x.shape[0], 1, 4), "score_map": score_map, "backbone_feat": x}


def test_patch_model_on_official_structure():
    import fasttrack
    torch.manual_seed(0)
    net = _OfficialNet(4).eval()
    net.backbone.set_bernoulli(1.0)
    keys = sorted(net.state_dict())
    z, x = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before = net(z, x)
    report = fasttrack.patch_model(net)
    swapped = {path: rec for path, rec, _, _ in report.swapped}
    assert swapped == {"backbone": "compresstracker.backbone", "box_head": "ostrack.center_head"}, str(report)
    assert isinstance(net.backbone, FusedCompressTrackerBackbone)
    assert sorted(net.state_dict()) == keys
    net.backbone.set_bernoulli(1.0)          # the official tracker still calls it
    with torch.no_grad():
        after = net(z, x)
    for k in ("backbone_feat", "score_map", "pred_boxes"):
        assert_close(after[k], before[k], scale=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parity(dtype):
    torch.manual_seed(6)
    ref = CompressTrackerBackbone(4, **SMALL).eval().to(dtype)
    fused = FusedCompressTrackerBackbone.from_reference(ref)
    z, x = torch.randn(2, 3, 128, 128, dtype=dtype), torch.randn(2, 3, 256, 256, dtype=dtype)
    with torch.no_grad():
        a, b = ref(z, x)[0], fused(z, x)[0]
    assert b.dtype == dtype
    assert_close(b, a, scale=4)
