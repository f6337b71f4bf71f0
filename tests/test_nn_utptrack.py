"""UTPTrack-O / UTPTrack-S blocks: official semantics (restated from EIT-NLP/UTPTrack
``compression/{ce,ate}.py`` *_mma functions), fused vs reference parity, stacks at the released
pruning locations, training-mode backward."""
import math

import pytest
import torch
from torch import nn

import fasttrack
from fasttrack.nn.ostrack import ctr_point_mask
from fasttrack.nn.utptrack import (
    UTPTRACK_O_LOCS, UTPTRACK_S_LOCS, FusedUTPTrackOBlock, FusedUTPTrackSBlock, UTPTrackOBlock, UTPTrackSBlock,
)
from fasttrack.ops._registry import serving_kernel
from tests.tolerances import assert_close
from tests import helpers

_NATIVE = all(not serving_kernel(op, "cpu").startswith("none") for op in ("topk_select", "topk_select_qk"))
BACKENDS = ["reference",
            pytest.param("auto", marks=pytest.mark.skipif(not _NATIVE, reason="native CPU kernels not built"))]
FULL_BACKEND = "auto" if _NATIVE else "reference"


def _gi(B, start, L):
    return torch.arange(start, start + L).expand(B, L).contiguous()


# --------------------------------------------------------------------------------------------
# UTPTrack-S official pruning, restated (layout [cls, x, sz, dz, text])
# --------------------------------------------------------------------------------------------
def _rows(attn, r0, r1, c0, c1, box, task_index, letter, target):
    a = attn[:, :, r0:r1, c0:c1]
    if task_index is not None and (task_index == 1).any() and letter in target:
        text = attn[:, :, -1:, c0:c1] * (task_index == 1).float().view(-1, 1, 1, 1)
        a = torch.cat([a, text], dim=2)
        if box is not None:
            box = torch.cat([box, torch.ones(box.shape[0], 1, dtype=torch.bool)], dim=1)
    B, H = attn.shape[:2]
    if box is not None:
        a = a[box.unsqueeze(1).unsqueeze(-1).expand(-1, H, -1, a.shape[-1])].view(B, H, -1, c1 - c0)
    return a.mean(dim=2).mean(dim=1)


def _split_keep(score, k):
    idx = torch.sort(score, dim=1, descending=True, stable=True).indices
    return idx[:, :k], idx[:, k:]


def _take(t, idx):
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def official_ce(tokens, attn, lsz, ldz, keep, gi_x, box, ti, target):
    lx = tokens.shape[1] - 2 - lsz - ldz
    k = math.ceil(keep * lx)
    if k == lx:
        return tokens, gi_x, None
    s = _rows(attn, 1 + lx, 1 + lx + lsz, 1, 1 + lx, box, ti, "C", target)
    top, non = _split_keep(s, k)
    new = torch.cat([tokens[:, :1], _take(tokens[:, 1:1 + lx], top), tokens[:, 1 + lx:]], dim=1)
    return new, gi_x.gather(1, top), gi_x.gather(1, non)


def official_dte(tokens, attn, lsz, ldz, keep, gi_dz, box, ti, target):
    lx = tokens.shape[1] - 2 - lsz - ldz
    k = math.ceil(keep * ldz)
    if k == ldz:
        return tokens, gi_dz, None
    N = attn.shape[-1]  # negative offsets from the end, as the official fix does
    s = _rows(attn, N - 1 - ldz - lsz, N - 1 - ldz, N - 1 - ldz, N - 1, box, ti, "D", target)
    top, non = _split_keep(s, k)
    a = 1 + lx + lsz
    new = torch.cat([tokens[:, :a], _take(tokens[:, a:-1], top), tokens[:, -1:]], dim=1)
    return new, gi_dz.gather(1, top), gi_dz.gather(1, non)


def official_ste(tokens, attn, lsz, ldz, keep, gi_sz, box, ti, target, indicate):
    lx = tokens.shape[1] - 2 - lsz - ldz
    k = math.ceil(keep * lsz)
    if k == lsz:
        return tokens, gi_sz, None, box, indicate
    s = _rows(attn, 1 + lx, 1 + lx + lsz, 1 + lx, 1 + lx + lsz, box, ti, "S", target)
    if box is not None:
        s = s + box.float()  # +1 on the template centre
    if indicate is not None:
        s = s + indicate.float()
    top, non = _split_keep(s, k)
    a = 1 + lx
    new = torch.cat([tokens[:, :a], _take(tokens[:, a:a + lsz], top), tokens[:, a + lsz:]], dim=1)
    return (new, gi_sz.gather(1, top), gi_sz.gather(1, non), None if box is None else box.gather(1, top),
            None if indicate is None else indicate.gather(1, top))


def official_s_block(blk, xz, gi_sz, gi_dz, gi_x, box, indicate, ti):
    y, attn = blk.attn(blk.norm1(xz), return_attention=True)
    xz = xz + blk.gamma_1 * y
    lsz, ldz, tgt = gi_sz.shape[1], gi_dz.shape[1], blk.multimodal_aware_pruning_target
    rx = rdz = rsz = None
    if blk.keep_ratio_x < 1:
        xz, gi_x, rx = official_ce(xz, attn, lsz, ldz, blk.keep_ratio_x, gi_x, box, ti, tgt)
    if blk.keep_ratio_dz < 1:
        xz, gi_dz, rdz = official_dte(xz, attn, lsz, ldz, blk.keep_ratio_dz, gi_dz, box, ti, tgt)
        ldz = gi_dz.shape[1]
    if blk.keep_ratio_sz < 1:
        xz, gi_sz, rsz, box, indicate = official_ste(xz, attn, lsz, ldz, blk.keep_ratio_sz, gi_sz, box, ti, tgt,
                                                     indicate)
    xz = xz + blk.gamma_2 * blk.mlp(blk.norm2(xz))
    return xz, gi_sz, gi_dz, rsz, rdz, gi_x, rx, attn, box, indicate


S_DIM, S_HEADS, S_X, S_Z = 512, 8, 196, 49  # Fast-iTPN-B, 224 px search, 112 px templates


def _s_block(**kw):
    blk = UTPTrackSBlock(S_DIM, S_HEADS, mlp_ratio=3.0, qkv_bias=True, init_values=0.1,
                         norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), multimodal_aware_pruning_target="CDS", **kw)
    with torch.no_grad():
        blk.gamma_1.uniform_(0.5, 1.5)
        blk.gamma_2.uniform_(0.5, 1.5)
    return helpers.randomise(blk).eval()


def _s_inputs(B):
    N = 1 + S_X + 2 * S_Z + 1
    return (torch.randn(B, N, S_DIM), _gi(B, 0, S_Z), _gi(B, S_Z, S_Z), _gi(B, 0, S_X), ctr_point_mask(B, 7))


@pytest.mark.parametrize("ratios", [dict(keep_ratio_x=0.7), dict(keep_ratio_dz=0.6, keep_ratio_sz=0.6),
                                    dict(keep_ratio_x=0.7, keep_ratio_dz=0.6)])
@pytest.mark.parametrize("task", [None, "mixed", "none_text"])
@pytest.mark.parametrize("soft", [True, False])
def test_s_block_reference_equals_official(ratios, task, soft):
    B = 2
    blk = _s_block(**ratios)
    x, gsz, gdz, gx, box = _s_inputs(B)
    ti = {None: None, "mixed": torch.tensor([1, 0]), "none_text": torch.tensor([0, 0])}[task]
    indicate = torch.rand(B, S_Z) if soft else torch.rand(B, S_Z) > 0.5
    with fasttrack.use_backend("reference"), torch.no_grad():
        got = blk(x, None, None, gsz, gdz, gx, box, num_template=2, z_indicate_mask=indicate, task_index=ti)
        exp = official_s_block(blk, x, gsz, gdz, gx, box, indicate, ti)
    assert_close(got[0], exp[0], scale=4)
    for i in (1, 2, 3, 4, 5, 6, 8, 9):
        assert (got[i] is None and exp[i] is None) or torch.equal(got[i], exp[i]), i
    assert_close(got[7], exp[7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 4])
def test_fused_s_block_matches_reference(backend, B):
    ref = _s_block(keep_ratio_x=0.7, keep_ratio_dz=0.6, keep_ratio_sz=0.6)
    fused = FusedUTPTrackSBlock.from_reference(ref).eval()
    x, gsz, gdz, gx, box = _s_inputs(B)
    ti = torch.arange(B) % 2
    ind = torch.rand(B, S_Z)
    with fasttrack.use_backend(backend), torch.no_grad():
        assert fused._packed_ok(x)
        r = ref(x, None, None, gsz, gdz, gx, box, num_template=2, z_indicate_mask=ind, task_index=ti)
        f = fused(x, None, None, gsz, gdz, gx, box, num_template=2, z_indicate_mask=ind, task_index=ti)
        assert f[7] is None
        fused.return_attention = True
        fa = fused(x, None, None, gsz, gdz, gx, box, num_template=2, z_indicate_mask=ind, task_index=ti)
    for out in (f, fa):
        assert_close(out[0], r[0], scale=8)
        for i in (1, 2, 3, 4, 5, 6, 8, 9):
            assert torch.equal(out[i], r[i]), i
    assert_close(fa[7], r[7])


def test_fused_s_block_bf16():
    """bf16: packed GEMMs and the explicit fp32-logit core (faster than SDPA there); near-tied
    candidates may swap, so kept sets must agree almost everywhere."""
    ref = _s_block(keep_ratio_x=0.7, keep_ratio_dz=0.6, keep_ratio_sz=0.6).to(torch.bfloat16)
    fused = FusedUTPTrackSBlock.from_reference(ref).eval()
    x, gsz, gdz, gx, box = _s_inputs(2)
    x = x.to(torch.bfloat16)
    with fasttrack.use_backend(FULL_BACKEND), torch.no_grad():
        assert fused._packed_ok(x)
        r = ref(x, None, None, gsz, gdz, gx, box, num_template=2)
        f = fused(x, None, None, gsz, gdz, gx, box, num_template=2)
    assert f[0].dtype == torch.bfloat16 and f[0].shape == r[0].shape and f[7] is None
    for i in (1, 2, 5):
        for b in range(2):
            common = set(f[i][b].tolist()) & set(r[i][b].tolist())
            assert len(common) >= 0.9 * r[i].shape[1], i
    if all(torch.equal(f[i], r[i]) for i in (1, 2, 5)):
        assert_close(f[0].float(), r[0].float(), dtype=torch.bfloat16, scale=4)


def test_fused_s_block_same_keys_and_cache_refresh():
    ref = _s_block()
    keys = set(ref.state_dict())
    assert keys == {"gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                    "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.proj.weight",
                    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight",
                    "mlp.w2.bias", "mlp.ffn_ln.weight", "mlp.ffn_ln.bias", "mlp.w3.weight", "mlp.w3.bias"}
    assert set(FusedUTPTrackSBlock(S_DIM, S_HEADS, mlp_ratio=3.0, qkv_bias=True).state_dict()) == keys
    fused = FusedUTPTrackSBlock.from_reference(ref).eval()
    x, gsz, gdz, gx, box = _s_inputs(1)
    with fasttrack.use_backend("reference"), torch.no_grad():
        fused(x, None, None, gsz, gdz, gx, box, num_template=2)
        ref.gamma_2.mul_(-1.0)  # folded into w3: must refold
        ref.attn.k_proj.weight.mul_(0.5)  # concatenated into the qkv GEMM: must re-concatenate
        r = ref(x, None, None, gsz, gdz, gx, box, num_template=2)
        f = fused(x, None, None, gsz, gdz, gx, box, num_template=2)
    assert_close(f[0], r[0], scale=8)


def test_s_block_errors():
    blk = _s_block(keep_ratio_x=0.7)
    x, gsz, gdz, gx, box = _s_inputs(1)
    with pytest.raises(ValueError, match="num_template"):
        blk(x, None, None, gsz, gdz, gx, box, num_template=1)
    with pytest.raises(ValueError, match="layout"):
        blk(x[:, 1:], None, None, gsz, gdz, gx, box, num_template=2)
    with pytest.raises(ValueError, match="init_values"):
        UTPTrackSBlock(64, 4, init_values=None)


# --------------------------------------------------------------------------------------------
# UTPTrack-O (layout [x, sz, dz])
# --------------------------------------------------------------------------------------------
O_DIM, O_HEADS, O_X, O_Z = 768, 12, 256, 64


def _o_inputs(B):
    return torch.randn(B, O_X + 2 * O_Z, O_DIM), _gi(B, 0, O_Z), _gi(B, O_Z, O_Z), _gi(B, 0, O_X), ctr_point_mask(B, 8)


def test_o_block_reference_semantics():
    """Scores written out directly from the attention map: CE / DTE on the centre row, STE with
    the +1 centre bonus and the soft foreground bonus; pieces assembled in layout order."""
    B = 2
    blk = helpers.randomise(UTPTrackOBlock(O_DIM, O_HEADS, qkv_bias=True, keep_ratio_x=0.7, keep_ratio_dz=0.7,
                                    keep_ratio_sz=0.7)).eval()
    x, gsz, gdz, gx, box = _o_inputs(B)
    ind = torch.rand(B, O_Z)
    with fasttrack.use_backend("reference"), torch.no_grad():
        out = blk(x, gsz, gdz, gx, None, box, z_indicate_mask=ind)
        y, attn = blk.attn(blk.norm1(x), None, True)
        x1 = x + y
        row = attn[:, :, O_X + 27].mean(1)  # [B, N]: the centre row of the static template
        s_x, s_sz = row[:, :O_X], row[:, O_X:O_X + O_Z] + box.float() + ind
        s_dz = row[:, O_X + O_Z:]
        kx, _ = _split_keep(s_x, 180)
        ksz, _ = _split_keep(s_sz, 45)
        kdz, _ = _split_keep(s_dz, 45)
        tok = torch.cat([_take(x1[:, :O_X], kx), _take(x1[:, O_X:O_X + O_Z], ksz), _take(x1[:, O_X + O_Z:], kdz)], 1)
        exp = tok + blk.mlp(blk.norm2(tok))
    assert_close(out[0], exp, scale=4)
    assert torch.equal(out[5], kx) and torch.equal(out[1], ksz) and torch.equal(out[2], kdz + O_Z)
    assert torch.equal(out[8], box.gather(1, ksz)) and torch.equal(out[9], ind.gather(1, ksz))
    assert out[8].sum() == B  # the centre survives STE


def _run_o_stack(blocks, x, gsz, gdz, gx, box, ind):
    removed = []
    for blk in blocks:
        x, gsz, gdz, rsz, rdz, gx, rx, _, box, ind = blk(x, gsz, gdz, gx, None, box, z_indicate_mask=ind)
        removed.append((rsz, rdz, rx))
    return x, gsz, gdz, gx, removed


def test_o_stack_real_config_b1():
    """UTPTrack-O on ViT-B: CE at 3/6/9, DTE+STE at 4/7/10, keep 0.7, 12 blocks."""
    c = UTPTRACK_O_LOCS
    ref = nn.ModuleList([
        helpers.randomise(UTPTrackOBlock(O_DIM, O_HEADS, qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
                                  keep_ratio_x=c["ce_keep"] if i in c["ce_loc"] else 1.0,
                                  keep_ratio_dz=c["dte_keep"] if i in c["dte_loc"] else 1.0,
                                  keep_ratio_sz=c["ste_keep"] if i in c["ste_loc"] else 1.0))
        for i in range(12)]).eval()
    fused = nn.ModuleList([FusedUTPTrackOBlock.from_reference(b) for b in ref]).eval()
    inputs = _o_inputs(1) + (torch.rand(1, O_Z),)
    with fasttrack.use_backend(FULL_BACKEND), torch.no_grad():
        r = _run_o_stack(ref, *inputs)
        f = _run_o_stack(fused, *inputs)
    assert r[0].shape == (1, 89 + 23 + 23, O_DIM)  # x 256->180->126->89, each template 64->45->32->23
    assert_close(f[0], r[0], scale=20)
    for a, b in zip(f[1:4], r[1:4]):
        assert torch.equal(a, b)
    for fr, rr in zip(f[4], r[4]):
        for a, b in zip(fr, rr):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_o_block_b4(backend):
    ref = helpers.randomise(UTPTrackOBlock(O_DIM, O_HEADS, qkv_bias=True, keep_ratio_x=0.7, keep_ratio_dz=0.7,
                                    keep_ratio_sz=0.7)).eval()
    fused = FusedUTPTrackOBlock.from_reference(ref).eval()
    x, gsz, gdz, gx, box = _o_inputs(4)
    ind = torch.rand(4, O_Z) > 0.3
    with fasttrack.use_backend(backend), torch.no_grad():
        for m in (box, None):
            r = ref(x, gsz, gdz, gx, None, m, z_indicate_mask=ind)
            f = fused(x, gsz, gdz, gx, None, m, z_indicate_mask=ind)
            assert_close(f[0], r[0], scale=4)
            for i in (1, 2, 3, 4, 5, 6, 8, 9):
                assert (f[i] is None and r[i] is None) or torch.equal(f[i], r[i]), i


def test_s_stack_released_locations_reduced_depth():
    """UTPTrack-S pruning at its released locations, CE at 6 then DTE/STE at 9 (blocks 0..9)."""
    c = UTPTRACK_S_LOCS
    ref = nn.ModuleList([_s_block(keep_ratio_x=c["ce_keep"] if i in c["ce_loc"] else 1.0,
                                  keep_ratio_dz=c["dte_keep"] if i in c["dte_loc"] else 1.0,
                                  keep_ratio_sz=c["ste_keep"] if i in c["ste_loc"] else 1.0) for i in range(10)])
    fused = nn.ModuleList([FusedUTPTrackSBlock.from_reference(b) for b in ref]).eval()
    x, gsz, gdz, gx, box = _s_inputs(1)
    ind, ti = torch.rand(1, S_Z), torch.tensor([1])

    def run(blocks, x, gsz, gdz, gx, box, ind):
        for blk in blocks:
            x, gsz, gdz, _, _, gx, _, _, box, ind = blk(x, None, None, gsz, gdz, gx, box, num_template=2,
                                                        z_indicate_mask=ind, task_index=ti)
        return x, gsz, gdz, gx

    with fasttrack.use_backend(FULL_BACKEND), torch.no_grad():
        r = run(ref, x, gsz, gdz, gx, box, ind)
        f = run(fused, x, gsz, gdz, gx, box, ind)
    assert r[0].shape[1] == 1 + 138 + 30 + 30 + 1
    assert_close(f[0], r[0], scale=20)
    for a, b in zip(f[1:], r[1:]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# training mode
# --------------------------------------------------------------------------------------------
def _grads(blk, x, call):
    x = x.detach().clone().requires_grad_(True)
    out = call(blk, x)
    (out[0].square().mean()).backward()
    g = {n: p.grad.clone() for n, p in blk.named_parameters() if p.grad is not None}
    blk.zero_grad()
    return out[0], x.grad, g


@pytest.mark.parametrize("family", ["O", "S"])
def test_training_forward_backward(family):
    if family == "O":
        ref = helpers.randomise(UTPTrackOBlock(256, 4, qkv_bias=True, keep_ratio_x=0.7, keep_ratio_dz=0.7, keep_ratio_sz=0.7))
        fused = FusedUTPTrackOBlock.from_reference(ref)
        B = 2
        x, gsz, gdz, gx = torch.randn(B, 100 + 32, 256), _gi(B, 0, 16), _gi(B, 16, 16), _gi(B, 0, 100)

        def call(blk, t):
            return blk(t, gsz, gdz, gx, None, None, z_indicate_mask=torch.ones(B, 16) * 0.5)
    else:
        ref = UTPTrackSBlock(128, 4, mlp_ratio=3.0, qkv_bias=True, keep_ratio_x=0.7, keep_ratio_dz=0.6,
                             keep_ratio_sz=0.6, multimodal_aware_pruning_target="CDS")
        helpers.randomise(ref)
        fused = FusedUTPTrackSBlock.from_reference(ref)
        B = 2
        x, gsz, gdz, gx = torch.randn(B, 1 + 64 + 32 + 1, 128), _gi(B, 0, 16), _gi(B, 16, 16), _gi(B, 0, 64)
        box = torch.zeros(B, 16, dtype=torch.bool)
        box[:, 5] = True  # a 4x4 template's centre

        def call(blk, t):
            return blk(t, None, None, gsz, gdz, gx, box, num_template=2, task_index=torch.tensor([1, 0]))
    ref.train()
    fused.train()
    with fasttrack.use_backend("reference"):
        y_r, gx_r, g_r = _grads(ref, x, call)
        y_f, gx_f, g_f = _grads(fused, x, call)
    assert_close(y_f, y_r, scale=10)
    assert_close(gx_f, gx_r, scale=50)
    assert g_f.keys() == g_r.keys() and len(g_f) == len(list(ref.parameters()))
    for n in g_r:
        assert_close(g_f[n], g_r[n], scale=50)
