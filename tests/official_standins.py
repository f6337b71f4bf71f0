"""Stand-ins for the official trackers' modules, written for the tests from the official interfaces
(attribute names, constructor arguments, forward signatures, state-dict keys and quirks as the
official repositories have them; no official code is copied). fasttrack's modules are tested
against these, never against an idealised copy of themselves.

- timm (huggingface/pytorch-image-models, current): `TimmAttention` (``qkv``, ``q_norm`` / ``k_norm``,
  ``norm`` = ``scale_norm``, ``fused_attn``), `TimmMlp` (``fc1, act, drop1, norm, fc2, drop2``),
  `TimmBlock` (``ls1`` / ``ls2`` LayerScale, ``drop_path1`` / ``drop_path2``), `TimmResPostBlock`;
- SUTrack / Fast-iTPN (chenxin-dlut/SUTrack ``fastitpn.py``, ``subln=True``): `SUTrackAttention`
  (``q_proj / k_proj / v_proj`` without bias, ``q_bias`` / ``v_bias``, ``forward(x, rel_pos_bias,
  attn_mask)``, fp32 logits), `SUTrackSwiGLU`, `SUTrackBlock` (``gamma_1`` / ``gamma_2``, one
  ``drop_path``, ``forward(x, rel_pos_bias=None, attn_mask=None)``);
- AVTrack (wuyou3474/AVTrack ``vision_transformer.py``): `AVTrackBlock` = `TimmBlock` +
  ``active_score_module = Linear(320, 1)``; `AVTrackVisionTransformer` with the gating loop of
  ``forward_features`` (blocks 0, 1 ungated; eval runs a gated block on the whole batch if any
  sample's ``sigmoid > 0.5``; training on the passing samples) and AVTrack's non-SDPA quirk
  (``attn + 0.1 * attn ** 2`` when ``fused_attn`` is off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """timm's, by name and attribute (``drop_prob``)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(keep) / keep


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False, attn_drop=0.0,
                 proj_drop=0.0, norm_layer=nn.LayerNorm, quirk=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._quirk = quirk   # AVTrack: "avtrack" adds 0.1 * attn ** 2 on the non-fused path

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = attn.softmax(dim=-1)
            if self._quirk == "avtrack":
                attn = attn + 0.1 * attn ** 2
            x = self.attn_drop(attn) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), act_layer(), nn.Dropout(drop)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, scale_attn_norm=False,
                 init_values=None, drop_path=0.0, norm_layer=nn.LayerNorm, quirk=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TimmAttention(dim, num_heads, qkv_bias, qk_norm, scale_attn_norm, norm_layer=norm_layer,
                                  quirk=quirk)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimmResPostBlock(nn.Module):
    """Res-post-norm (Swin-v2 style): the norm on the branch output, not the residual's input."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.attn = TimmAttention(dim, num_heads, qkv_bias)
        self.norm1 = norm_layer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))
        self.norm2 = norm_layer(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.norm1(self.attn(x, attn_mask=attn_mask)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


# ------------------------------------------------------------------------------------- SUTrack
class SUTrackAttention(nn.Module):
    """Fast-iTPN ``Attention`` with ``subln=True`` (SUTrack's settings)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.relative_position_bias_table = None
        self.rel_pos_bias = None
        self.qk_float = True
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.subln, self.deepnorm = True, False

    def forward(self, x, rel_pos_bias=None, attn_mask=None):
        B, N, C = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        k = F.linear(x, self.k_proj.weight, None).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        v = F.linear(x, self.v_proj.weight, self.v_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q = q * self.scale
        attn = q.float() @ k.float().transpose(-2, -1)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias.type_as(attn)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask.bool()[:, None, None, :], float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1).type_as(x))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))


class SUTrackSwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.act = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.SiLU()
        self.ffn_ln, self.w3, self.drop = nn.LayerNorm(hidden, eps=1e-6), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x))))


class SUTrackBlock(nn.Module):
    """SUTrack's main block: ``blocks.{i}`` keys gamma_1, gamma_2, norm1, attn.q_bias, attn.v_bias,
    attn.{q,k,v}_proj.weight, attn.proj, norm2, mlp.w1, mlp.w2, mlp.ffn_ln, mlp.w3."""

    def __init__(self, dim=128, num_heads=4, mlp_ratio=3.0, init_values=0.1, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SUTrackAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SUTrackSwiGLU(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        self.postnorm = self.deepnorm = False

    def forward(self, x, rel_pos_bias=None, attn_mask=None):
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias, attn_mask=attn_mask))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


# -------------------------------------------------------------------------------------- AVTrack
class AVTrackBlock(TimmBlock):
    def __init__(self, dim, num_heads, num_tokens=320, **kw):
        super().__init__(dim, num_heads, **kw)
        self.active_score_module = nn.Linear(num_tokens, 1)


class _PatchEmbed(nn.Module):
    def __init__(self, dim, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class AVTrackVisionTransformer(nn.Module):
    """AVTrack's backbone after building (``num_classes=0``), with ``forward_features``' gating."""

    def __init__(self, dim=64, depth=5, num_heads=2, lz=64, lx=256, quirk=None):
        super().__init__()
        self.patch_embed = _PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[AVTrackBlock(dim, num_heads, num_tokens=lz + lx, qkv_bias=True,
                                                   norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), quirk=quirk)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head = nn.Identity()
        self.pos_embed_z = nn.Parameter(torch.randn(1, lz, dim) * 0.02)
        self.pos_embed_x = nn.Parameter(torch.randn(1, lx, dim) * 0.02)

    def forward(self, z, x, tnc_keep_rate=None, return_last_attn=False, is_distill=False):
        x = self.patch_embed(x)
        z = self.patch_embed(z)
        z += self.pos_embed_z
        x += self.pos_embed_x
        x = torch.cat((z, x), dim=1)
        x = self.pos_drop(x)
        probs_active = []
        for i, blk in enumerate(self.blocks):
            if i > 1 and not is_distill:
                prob_active = (blk.active_score_module(x[:, :, 0].clone())).sigmoid_()
                idx, _ = torch.where(prob_active > 0.5)
                if len(idx) > 0:
                    if self.training:
                        x[idx] = blk(x[idx])
                    else:
                        x = blk(x)
                probs_active.append(prob_active)
            else:
                x = blk(x)
        return self.norm(x), {"attn": None, "probs_active": probs_active}
