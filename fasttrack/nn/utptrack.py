"""UTPTrack token pruning blocks: UTPTrack-O (OSTrack-based) and UTPTrack-S (SUTrack Fast-iTPN).

UTPTrack prunes three token groups inside a block, all scored by the same attention (computed
before any pruning) from the static-template rows selected by ``ce_template_mask`` (the template
centre):
- CE  (candidate elimination): search tokens ``x``, keep ``keep_ratio_x``;
- DTE (dynamic template elimination): dynamic-template tokens ``dz``;
- STE (static template elimination): static-template tokens ``sz``, with a bonus of +1 on the
  ``ce_template_mask`` positions (the centre is never pruned) plus the token-type-aware foreground
  bonus ``z_indicate_mask`` (bool: +1 on True — UTPTrack's FULL_/ALL_FOREGROUND, which its backbone
  turns into a bool mask before the blocks; float: added as is — SOFT_ALL_FOREGROUND); the template
  masks are then re-ordered with the kept tokens (``mask.gather(keep)``) for later blocks.
UTPTrack-S adds a text-guided row: with ``task_index`` given and some sample having task 1 and the
group's letter (``'C'``, ``'D'``, ``'S'``) in ``multimodal_aware_pruning_target``, the text token's
attention row joins the query rows with weight ``(task_index == 1)`` per sample (the `query_weight`
of `topk_select`; the mean is over all rows, the zero-weighted included, as the official code).

Semantics follow EIT-NLP/UTPTrack ``UTPTrack-S/lib/models/sutrackcmp/ceatettamma_fastitpn.py`` and
``compression/{ce,ate}.py`` (``*_mma`` functions). Choices where the public code is silent or
differs (documented here, repeated in the report):
- UTPTrack-O's code is not public. `UTPTrackOBlock` is OSTrack's CEBlock (same keys) with the
  UTPTrack-S pruning rules on the layout ``[x, sz, dz]`` (no cls / text token, no text row).
- Within one block every group is selected from the same pre-pruning tokens and attention, and the
  kept pieces are assembled in layout order. With CE and DTE/STE in different blocks (the released
  configs: O at 3/6/9 and 4/7/10, S at 6/12/18 and 9/15/21) this equals the official sequence CE,
  DTE, STE; when they share a block the official STE slices the attention with the post-CE length
  (a misalignment) and this implementation scores the intended rows.
- Ties in scores go to the lower index (stable sort); global indices are int64.
Fused blocks run SDPA and score with `topk_select_qk` (``attn`` returned as None unless
``return_attention``); an explicit attention map is built only when asked for or when a mask /
relative position bias must enter the scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from functools import partial

from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.ce import (
    Scorer, active_ratio, ce_query_index, check_index, index_range, template_mask,
)
from fasttrack.nn.cuda_graph import GraphedStep, require_graph_inputs
from fasttrack.nn.derived import Derived
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
from fasttrack.nn.linear import _packable
from fasttrack.nn.ostrack import OSTrack, PatchEmbed, VisionTransformerCE, _init_vit
from fasttrack.nn._recognizers import forward_params, has_attrs, is_linear, probe_like, register_recognizer
from fasttrack.ops import pad_scatter
from fasttrack.nn.vit import block_dim, fused_vit_block, vit_block_parts
from fasttrack.nn.vit import (
    Block, FusedBlock, _identity_like, drop_path_of, drop_path_or_identity, sdpa_is_faster,
    share_block_parts,
)

__all__ = ["UTPTrackOBlock", "FusedUTPTrackOBlock", "UTPTrackOViT", "FusedUTPTrackOViT", "UTPTrackO",
           "FusedUTPTrackO", "build_utptrack_o", "ITPNAttention", "SwiGLU", "UTPTrackSBlock",
           "FusedUTPTrackSBlock", "prune_groups", "UTPTRACK_O_LOCS", "UTPTRACK_S_LOCS"]

# (ce_loc, ce_keep, dte_loc, dte_keep, ste_loc, ste_keep) of the released configurations
UTPTRACK_O_LOCS = dict(ce_loc=(3, 6, 9), ce_keep=0.7, dte_loc=(4, 7, 10), dte_keep=0.7,
                       ste_loc=(4, 7, 10), ste_keep=0.7)
UTPTRACK_S_LOCS = dict(ce_loc=(6, 12, 18), ce_keep=0.7, dte_loc=(9, 15, 21), dte_keep=0.6,
                       ste_loc=(9, 15, 21), ste_keep=0.6)


def prune_groups(x, scorer: Scorer, *, n_cls, n_text, global_index_sz, global_index_dz, global_index_x,
                 ce_template_mask, z_indicate_mask, ratio_x, ratio_dz, ratio_sz, text_weight=None, text_targets="",
                 query_count=None):
    """CE / DTE / STE of one block (module docstring). ``ratio_*`` None = that group is not pruned.
    ``ce_template_mask``: any form `fasttrack.nn.ce.ce_query_index` takes; ``query_count``: its
    True entries per row when the caller knows it (nothing is then read back on the host).
    Returns ``(x, gi_sz, gi_dz, removed_sz, removed_dz, gi_x, removed_x, ce_template_mask,
    z_indicate_mask)``; the mask comes back as a bool tensor when a group was pruned."""
    B, N = x.shape[0], x.shape[1]
    for name, t in (("global_index_sz", global_index_sz), ("global_index_dz", global_index_dz),
                    ("global_index_x", global_index_x)):
        check_index(t, name, B)
    lens_sz, lens_dz, lens_x = global_index_sz.shape[1], global_index_dz.shape[1], global_index_x.shape[1]
    if n_cls + lens_x + lens_sz + lens_dz + n_text != N:
        raise ValueError(f"`x` has {N} tokens but the layout [cls]*{n_cls} + x {lens_x} + static z {lens_sz} + "
                         f"dynamic z {lens_dz} + [text]*{n_text} needs {n_cls + lens_x + lens_sz + lens_dz + n_text}")
    if z_indicate_mask is not None and tuple(z_indicate_mask.shape) != (B, lens_sz):
        raise ValueError(f"`z_indicate_mask` must have shape [{B}, {lens_sz}], got {list(z_indicate_mask.shape)}")
    s_x, s_sz = n_cls, n_cls + lens_x
    s_dz = s_sz + lens_sz
    if ratio_x is None and ratio_dz is None and ratio_sz is None:
        return (x, global_index_sz, global_index_dz, None, None, global_index_x, None, ce_template_mask,
                z_indicate_mask)
    if query_count is None or not isinstance(ce_template_mask, torch.Tensor) or ce_template_mask.dtype != torch.bool:
        ce_template_mask, query_count = template_mask(ce_template_mask, B, lens_sz, x.device)
    qi = ce_query_index(ce_template_mask, B, lens_sz, s_sz, x.device, count=query_count)

    def rows(letter):
        if n_text and text_weight is not None and letter in text_targets:
            text_row = torch.full((B, 1), N - 1, dtype=torch.int64, device=x.device)
            w = torch.cat([torch.ones(B, qi.shape[1], device=x.device), text_weight.float().view(B, 1)], dim=1)
            return torch.cat([qi, text_row], dim=1), w
        return qi, None

    # every group is selected from the same pre-pruning tokens (the op's attention positions), then
    # the kept pieces are assembled in layout order
    removed_sz = removed_dz = removed_x = None
    sels = {}
    if ratio_dz is not None:
        r, w = rows("D")
        sel = scorer.select(x, r, ratio_dz, s_dz, lens_dz, global_index_dz, query_weight=w)
        if sel is not None:
            sels["dz"] = (s_dz, lens_dz, sel)
            global_index_dz, removed_dz = sel.keep_global, sel.removed_global
    if ratio_sz is not None:
        r, w = rows("S")
        bonus = None
        if ce_template_mask is not None:
            bonus = ce_template_mask.float()
        if z_indicate_mask is not None:
            bonus = z_indicate_mask.float() if bonus is None else bonus + z_indicate_mask.float()
        sel = scorer.select(x, r, ratio_sz, s_sz, lens_sz, global_index_sz, query_weight=w, bonus=bonus)
        if sel is not None:
            sels["sz"] = (s_sz, lens_sz, sel)
            global_index_sz, removed_sz = sel.keep_global, sel.removed_global
            if ce_template_mask is not None:
                ce_template_mask = ce_template_mask.gather(1, sel.keep_index)
            if z_indicate_mask is not None:
                z_indicate_mask = z_indicate_mask.gather(1, sel.keep_index)
    if ratio_x is not None:
        r, w = rows("C")
        sel = scorer.select(x, r, ratio_x, s_x, lens_x, global_index_x, query_weight=w)
        if sel is not None:
            sels["x"] = (s_x, lens_x, sel)
            global_index_x, removed_x = sel.keep_global, sel.removed_global
    if len(sels) == 1:
        x = next(iter(sels.values()))[2].tokens
    elif sels:
        pieces, pos = [], 0
        for start, length, sel in sorted(sels.values(), key=lambda t: t[0]):
            k = sel.keep_index.shape[1]
            pieces += [x[:, pos:start], sel.tokens[:, start:start + k]]
            pos = start + length
        x = torch.cat(pieces + [x[:, pos:]], dim=1)
    return (x, global_index_sz, global_index_dz, removed_sz, removed_dz, global_index_x, removed_x,
            ce_template_mask, z_indicate_mask)


def _out(res, attn):
    """prune_groups' tuple -> the official block outputs (attn inserted before the masks)."""
    x, gsz, gdz, rsz, rdz, gx, rx, ctm, zim = res
    return x, gsz, gdz, rsz, rdz, gx, rx, attn, ctm, zim


# --------------------------------------------------------------------------------------------
# UTPTrack-O
# --------------------------------------------------------------------------------------------
class UTPTrackOBlock(Block):
    """UTPTrack-O block (reference): OSTrack CEBlock structure (keys ``norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2``) with CE / DTE / STE on ``[x, static z, dynamic z]``.

    forward(x, global_index_sz, global_index_dz, global_index_x, mask=None, ce_template_mask=None,
    keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None, z_indicate_mask=None) ->
    (x, global_index_sz, global_index_dz, removed_index_sz, removed_index_dz, global_index_x,
    removed_index_x, attn, ce_template_mask, z_indicate_mask)  — UTPTrack-S's block outputs.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, keep_ratio_x=1.0, keep_ratio_dz=1.0, keep_ratio_sz=1.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.keep_ratio_x, self.keep_ratio_dz, self.keep_ratio_sz = keep_ratio_x, keep_ratio_dz, keep_ratio_sz

    def _prune(self, x, scorer, gi_sz, gi_dz, gi_x, ce_template_mask, kx, kdz, ksz, z_indicate_mask, count):
        return prune_groups(x, scorer, n_cls=0, n_text=0, global_index_sz=gi_sz, global_index_dz=gi_dz,
                            global_index_x=gi_x, ce_template_mask=ce_template_mask, z_indicate_mask=z_indicate_mask,
                            ratio_x=active_ratio(self.keep_ratio_x, kx), ratio_dz=active_ratio(self.keep_ratio_dz, kdz),
                            ratio_sz=active_ratio(self.keep_ratio_sz, ksz), query_count=count)

    def forward(self, x, global_index_sz, global_index_dz, global_index_x, mask=None, ce_template_mask=None,
                keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None, z_indicate_mask=None, ce_query_count=None):
        y, attn = self.attn(self.norm1(x), mask, True)
        x = x + self.drop_path(y)
        res = self._prune(x, Scorer(attn=attn), global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                          keep_ratio_x, keep_ratio_dz, keep_ratio_sz, z_indicate_mask, ce_query_count)
        x = res[0]
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return _out((x,) + res[1:], attn)


class FusedUTPTrackOBlock(FusedBlock):
    """`UTPTrackOBlock` on SDPA + `topk_select_qk` + packed GEMMs; same constructor (plus
    ``return_attention``), keys and forward."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, keep_ratio_x=1.0, keep_ratio_dz=1.0, keep_ratio_sz=1.0,
                 return_attention=False):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.keep_ratio_x, self.keep_ratio_dz, self.keep_ratio_sz = keep_ratio_x, keep_ratio_dz, keep_ratio_sz
        self.return_attention = return_attention

    @classmethod
    def from_reference(cls, ref_module, return_attention=False) -> "FusedUTPTrackOBlock":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        share_block_parts(m, ref_module, cls.__name__)
        for k in ("keep_ratio_x", "keep_ratio_dz", "keep_ratio_sz"):
            setattr(m, k, float(getattr(ref_module, k)))
        m.return_attention = return_attention
        return m

    _prune = UTPTrackOBlock._prune

    def forward(self, x, global_index_sz, global_index_dz, global_index_x, mask=None, ce_template_mask=None,
                keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None, z_indicate_mask=None, ce_query_count=None):
        if self.return_attention or mask is not None:
            y, attn = self.attn(self.norm1(x), mask, True)
            x, scorer = x + self.drop_path(y), Scorer(attn=attn)
        else:
            x, q, k, amap = self.attn_residual(x)
            scorer = Scorer(attn=amap) if amap is not None else Scorer(q=q, k=k, scale=self.attn.scale)
            attn = None
        res = self._prune(x, scorer, global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                          keep_ratio_x, keep_ratio_dz, keep_ratio_sz, z_indicate_mask, ce_query_count)
        return _out((self.mlp_residual(res[0]),) + res[1:], attn)


# --------------------------------------------------------------------------------------------
# UTPTrack-S (Fast-iTPN block, subln + SwiGLU + layer scale)
# --------------------------------------------------------------------------------------------
class ITPNAttention(nn.Module):
    """Fast-iTPN ``Attention`` with ``subln=True``: separate bias-free ``q_proj / k_proj / v_proj``,
    ``q_bias`` / ``v_bias`` (no k bias), ``q * scale`` then fp32 logits (``qk_float``), softmax cast
    back to x's dtype. ``attn_mask [B, N]`` bool: True = the key takes part (Fast-iTPN's
    convention, the inverse of OSTrack's). ``rel_pos_bias`` (``[B or 1, H, N, N]``) is added to
    the logits."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ITPNAttention: `dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def sharing(cls, ref: nn.Module) -> "ITPNAttention":
        """This attention over ``ref``'s parameters (no copy): an official Fast-iTPN / SUTrack
        ``Attention`` with ``subln`` (``q_proj`` / ``k_proj`` / ``v_proj`` without bias, ``q_bias``,
        ``v_bias``, ``proj``), whose own forward has no ``return_attention`` and no fp16 / bf16
        fused path. Relative position bias tables are refused (SUTrack passes ``rel_pos_bias=None``)."""
        who = f"{cls.__name__}.sharing"
        for name in ("q_proj", "k_proj", "v_proj", "proj"):
            if not isinstance(getattr(ref, name, None), nn.Linear):
                raise TypeError(f"{who}: `attn.{name}` must be an nn.Linear (the subln Fast-iTPN attention)")
        for name in ("relative_position_bias_table", "rel_pos_bias"):
            if getattr(ref, name, None) is not None:
                raise TypeError(f"{who}: `attn.{name}` (relative position bias) is not supported")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.num_heads, m.scale = int(ref.num_heads), float(ref.scale)
        for name in ("q_proj", "k_proj", "v_proj", "proj"):
            setattr(m, name, getattr(ref, name))
        m.q_bias, m.v_bias = getattr(ref, "q_bias", None), getattr(ref, "v_bias", None)
        m.attn_drop = ref.attn_drop if getattr(ref, "attn_drop", None) is not None else nn.Dropout(0.0)
        m.proj_drop = ref.proj_drop if getattr(ref, "proj_drop", None) is not None else nn.Dropout(0.0)
        m.train(ref.training)
        return m

    def _heads(self, t, B, N):
        return t.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)

    def qkv(self, x):
        B, N, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight, None)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        return self._heads(q, B, N), self._heads(k, B, N), self._heads(v, B, N)

    def explicit(self, q, k, v, x_dtype, rel_pos_bias=None, attn_mask=None):
        attn = (q * self.scale).float() @ k.float().transpose(-2, -1)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias.type_as(attn)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask.bool()[:, None, None, :], float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1).to(x_dtype))
        B, H, N, D = v.shape
        return (attn @ v).transpose(1, 2).reshape(B, N, H * D), attn

    def forward(self, x, rel_pos_bias=None, attn_mask=None, return_attention=False):
        q, k, v = self.qkv(x)
        o, attn = self.explicit(q, k, v, x.dtype, rel_pos_bias, attn_mask)
        o = self.proj_drop(self.proj(o))
        return (o, attn) if return_attention else o


class SwiGLU(nn.Module):
    """Fast-iTPN ``SwiGLU`` with ``subln=True``: ``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU, drop=0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w1 = nn.Linear(in_features, hidden_features)
        self.w2 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.ffn_ln = norm_layer(hidden_features)
        self.w3 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def hidden(self, x):
        return self.ffn_ln(self.act(self.w1(x)) * self.w2(x))

    def forward(self, x):
        return self.drop(self.w3(self.hidden(x)))


class UTPTrackSBlock(nn.Module):
    """UTPTrack-S block (reference): SUTrack's Fast-iTPN main block (``subln``, ``naiveswiglu``,
    layer scale) with CE / DTE / STE on ``[cls, x, static z, dynamic z, text]``.

    Keys: ``gamma_1, gamma_2, norm1, attn.q_bias, attn.v_bias, attn.{q,k,v}_proj.weight,
    attn.proj, norm2, mlp.w1, mlp.w2, mlp.ffn_ln, mlp.w3``. ``init_values`` must be > 0 (the
    released models use layer scale; the official forward multiplies by ``gamma`` unconditionally).

    forward(xz, rel_pos_bias=None, attn_mask=None, global_index_sz, global_index_dz, global_index_x,
    ce_template_mask=None, keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None, num_template=1,
    z_indicate_mask=None, task_index=None) -> (xz, global_index_sz, global_index_dz, removed_index_sz,
    removed_index_dz, global_index_x, removed_index_x, attn, ce_template_mask, z_indicate_mask).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=0.1, norm_layer=nn.LayerNorm, keep_ratio_x=1.0, keep_ratio_dz=1.0,
                 keep_ratio_sz=1.0, token_type_aware_pruing=None, multimodal_aware_pruning_target=None):
        super().__init__()
        if not (init_values and init_values > 0):
            raise ValueError(f"UTPTrackSBlock: `init_values` must be > 0 (layer scale), got {init_values!r}")
        self.norm1 = norm_layer(dim)
        self.attn = ITPNAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), norm_layer=norm_layer)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        self.keep_ratio_x, self.keep_ratio_dz, self.keep_ratio_sz = keep_ratio_x, keep_ratio_dz, keep_ratio_sz
        self.token_type_aware_pruing = token_type_aware_pruing
        self.multimodal_aware_pruning_target = multimodal_aware_pruning_target

    def _prune(self, xz, scorer, gi_sz, gi_dz, gi_x, ce_template_mask, kx, kdz, ksz, num_template, z_indicate_mask,
               task_index):
        ratios = (active_ratio(self.keep_ratio_x, kx), active_ratio(self.keep_ratio_dz, kdz), active_ratio(self.keep_ratio_sz, ksz))
        if any(r is not None for r in ratios) and num_template != 2:
            raise ValueError("`num_template` must be 2 for UTPTrack-S pruning (static + dynamic template), "
                             f"got {num_template}")
        text_weight = None
        if task_index is not None and bool((task_index == 1).any()):
            text_weight = (task_index == 1).float().view(-1)
        return prune_groups(xz, scorer, n_cls=1, n_text=1, global_index_sz=gi_sz, global_index_dz=gi_dz,
                            global_index_x=gi_x, ce_template_mask=ce_template_mask, z_indicate_mask=z_indicate_mask,
                            ratio_x=ratios[0], ratio_dz=ratios[1], ratio_sz=ratios[2], text_weight=text_weight,
                            text_targets=self.multimodal_aware_pruning_target or "")

    def forward(self, xz, rel_pos_bias=None, attn_mask=None, global_index_sz=None, global_index_dz=None,
                global_index_x=None, ce_template_mask=None, keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None,
                num_template=1, z_indicate_mask=None, task_index=None):
        y, attn = self.attn(self.norm1(xz), rel_pos_bias=rel_pos_bias, attn_mask=attn_mask, return_attention=True)
        xz = xz + self.drop_path(self.gamma_1 * y)
        res = self._prune(xz, Scorer(attn=attn), global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                          keep_ratio_x, keep_ratio_dz, keep_ratio_sz, num_template, z_indicate_mask, task_index)
        xz = res[0]
        xz = xz + self.drop_path(self.gamma_2 * self.mlp(self.norm2(xz)))
        return _out((xz,) + res[1:], attn)


class _PackedPair(Derived):
    """A oneDNN-packed ``(weight, bias)`` derived from Parameters (concatenated, or scaled by a
    layer-scale gamma); `fasttrack.nn.derived` states when it is rebuilt."""

    __slots__ = ()

    def get(self, sources, build):
        def packed():
            w, b = build()
            return torch.ops.mkldnn._reorder_linear_weight(w.contiguous()), b
        return super().get(sources, packed)


class FusedUTPTrackSBlock(UTPTrackSBlock):
    """`UTPTrackSBlock` for inference speed; same constructor (plus ``return_attention``), keys and
    forward. On the packed path (CPU, fp32/bf16, no gradient needed) q/k/v run as one GEMM on the
    concatenated weight, w1/w2 as one GEMM, and ``gamma_1`` / ``gamma_2`` are folded into proj / w3
    with the residual add as a oneDNN post-op; attention is SDPA and scoring `topk_select_qk`.
    Otherwise (training, autograd) the same math runs unfused with SDPA."""

    def __init__(self, *args, return_attention=False, **kw):
        super().__init__(*args, **kw)
        self.return_attention = return_attention
        self._init_caches()

    def _init_caches(self):
        self._qkv_c, self._w12_c, self._proj_c, self._w3_c = _PackedPair(), _PackedPair(), _PackedPair(), _PackedPair()

    @classmethod
    def from_reference(cls, ref_module, return_attention=False) -> "FusedUTPTrackSBlock":
        """Share ``ref_module``'s parameters (any module with the Fast-iTPN subln/SwiGLU structure)."""
        need = ["norm1", "norm2", "gamma_1", "gamma_2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                "attn.num_heads", "attn.scale", "mlp.w1", "mlp.w2", "mlp.w3", "mlp.ffn_ln", "mlp.act"]

        def present(path):
            obj = ref_module
            for part in path.split("."):
                obj = getattr(obj, part, None)
            return obj is not None
        missing = [p for p in need if not present(p)]
        if missing:
            raise TypeError(f"{cls.__name__}.from_reference: `ref_module` ({type(ref_module).__name__}) "
                            f"lacks {missing}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("norm1", "norm2", "gamma_1", "gamma_2"):
            setattr(m, k, getattr(ref_module, k))
        # its own attention over the official parameters: the official module has neither the
        # explicit-map interface (return_attention, masks) nor the fused paths this block calls
        a = ref_module.attn
        m.attn = a if isinstance(a, ITPNAttention) else ITPNAttention.sharing(a)
        m.mlp = ref_module.mlp
        m.drop_path = drop_path_of(ref_module, cls.__name__)
        for k in ("keep_ratio_x", "keep_ratio_dz", "keep_ratio_sz"):
            setattr(m, k, float(getattr(ref_module, k, 1.0)))
        m.token_type_aware_pruing = getattr(ref_module, "token_type_aware_pruing", None)
        m.multimodal_aware_pruning_target = getattr(ref_module, "multimodal_aware_pruning_target", None)
        m.return_attention = return_attention
        m._init_caches()
        m.train(ref_module.training)
        return m

    # -- packed pieces ------------------------------------------------------------------------
    def _packed_ok(self, x):
        a = self.attn
        return (_packable(x, a.q_proj.weight, a.q_bias) and _packable(x, self.mlp.w1.weight, self.mlp.w1.bias)
                and _packable(x, self.gamma_1, None) and _identity_like(self.drop_path)
                and _identity_like(a.proj_drop) and _identity_like(self.mlp.drop) and isinstance(self.mlp.act, nn.SiLU))

    def _qkv_packed(self, x):
        a = self.attn
        C = a.q_proj.weight.shape[0]

        def build():
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            if a.q_bias is None:
                return w, None
            return w, torch.cat([a.q_bias, torch.zeros_like(a.v_bias), a.v_bias])
        packed, b = self._qkv_c.get((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.q_bias, a.v_bias), build)
        B, N, _ = x.shape
        qkv = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        q, k, v = qkv.reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _scaled_add(self, cache, lin, gamma, h, residual):
        packed, b = cache.get((lin.weight, lin.bias, gamma),
                              lambda: (lin.weight * gamma[:, None], None if lin.bias is None else lin.bias * gamma))
        return torch.ops.mkldnn._linear_pointwise.binary(h, residual, packed, b, "add")

    def _mlp_packed(self, x, residual):
        m = self.mlp
        H = m.w1.weight.shape[0]
        packed, b = self._w12_c.get((m.w1.weight, m.w2.weight, m.w1.bias, m.w2.bias),
                                    lambda: (torch.cat([m.w1.weight, m.w2.weight]),
                                             None if m.w1.bias is None else torch.cat([m.w1.bias, m.w2.bias])))
        h12 = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        h = m.ffn_ln(F.silu(h12[..., :H]) * h12[..., H:])
        return self._scaled_add(self._w3_c, m.w3, self.gamma_2, h.contiguous(), residual.contiguous())

    # -- forward -----------------------------------------------------------------------------
    def forward(self, xz, rel_pos_bias=None, attn_mask=None, global_index_sz=None, global_index_dz=None,
                global_index_x=None, ce_template_mask=None, keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None,
                num_template=1, z_indicate_mask=None, task_index=None):
        a = self.attn
        h = self.norm1(xz)
        packed = self._packed_ok(xz)
        explicit = self.return_attention or rel_pos_bias is not None or attn_mask is not None
        q, k, v = self._qkv_packed(h) if packed else a.qkv(h)
        if explicit or not sdpa_is_faster(q):
            o, amap = a.explicit(q, k, v, xz.dtype, rel_pos_bias, attn_mask)
            # a map built only because it is the faster core (bf16) is not returned, as on SDPA
            scorer, attn = Scorer(attn=amap), (amap if explicit else None)
        else:
            p = a.attn_drop.p if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=a.scale)
            B, H, N, D = o.shape
            o = o.transpose(1, 2).reshape(B, N, H * D)
            attn, scorer = None, Scorer(q=q, k=k, scale=a.scale)
        if packed:
            xz = self._scaled_add(self._proj_c, a.proj, self.gamma_1, o.contiguous(), xz.contiguous())
        else:
            xz = xz + self.drop_path(self.gamma_1 * a.proj_drop(a.proj(o)))
        res = self._prune(xz, scorer, global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                          keep_ratio_x, keep_ratio_dz, keep_ratio_sz, num_template, z_indicate_mask, task_index)
        xz = res[0]
        if packed:
            xz = self._mlp_packed(self.norm2(xz), xz)
        else:
            xz = xz + self.drop_path(self.gamma_2 * self.mlp(self.norm2(xz)))
        return _out((xz,) + res[1:], attn)



# --------------------------------------------------------------------------------------------
# UTPTrack-O whole network: ViT-B backbone of UTPTrackOBlock + CENTER head
# --------------------------------------------------------------------------------------------
class UTPTrackOViT(nn.Module):
    """UTPTrack-O backbone (reference): OSTrack's ViT-B/16 (``VisionTransformerCE`` keys:
    ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}``, ``norm``, ``pos_embed_z``,
    ``pos_embed_x``) with `UTPTrackOBlock` blocks on the layout ``[x, static z, dynamic z]``.

    Choices (UTPTrack-O's code is not public): the dynamic template is embedded like the static one
    (same patch embedding and ``pos_embed_z``, as OSTrack-lineage multi-template trackers do); global
    indices are int64, static z ``0..Lz-1``, dynamic z ``Lz..2Lz-1``, search ``0..Lx-1``.

    forward(template, dynamic_template, search, ce_template_mask=None, z_indicate_mask=None) ->
    ``(search tokens [B, Lx, C] re-padded after the final norm (zeros where eliminated),
    kept template tokens [B, Lsz' + Ldz', C], aux)``, aux = ``{"kept_indexes": [gi_x, gi_sz, gi_dz],
    "removed_indexes_s": [...]}`` (search tokens removed at each CE block).
    """

    block_cls = UTPTrackOBlock

    def __init__(self, template_size=128, search_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, pretrain_img_size=224,
                 locs=None):
        super().__init__()
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size % patch_size:
                raise ValueError(f"`{name}` ({size}) must be a multiple of `patch_size` ({patch_size})")
        locs = dict(UTPTRACK_O_LOCS if locs is None else locs)
        missing = sorted(set(UTPTRACK_O_LOCS) - set(locs))
        if missing:
            raise ValueError(f"`locs` lacks {missing} (see UTPTRACK_O_LOCS)")
        for k in ("ce_loc", "dte_loc", "ste_loc"):
            bad = [i for i in locs[k] if not 0 <= i]
            if bad:
                raise ValueError(f"`locs[{k!r}]` has negative block indices {bad}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.feat_sz_z, self.feat_sz_x = template_size // patch_size, search_size // patch_size
        self.ce_loc = [i for i in locs["ce_loc"] if i < depth]
        self.patch_embed = PatchEmbed(pretrain_img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]

        def ratio(i, loc, keep):
            return float(locs[keep]) if i in locs[loc] else 1.0
        self.blocks = nn.Sequential(*[
            self.block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], norm_layer=norm_layer,
                           keep_ratio_x=ratio(i, "ce_loc", "ce_keep"), keep_ratio_dz=ratio(i, "dte_loc", "dte_keep"),
                           keep_ratio_sz=ratio(i, "ste_loc", "ste_keep"))
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.pos_embed_z = nn.Parameter(torch.zeros(1, self.feat_sz_z ** 2, embed_dim))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, self.feat_sz_x ** 2, embed_dim))
        for p in (self.cls_token, self.pos_embed, self.pos_embed_z, self.pos_embed_x):
            trunc_normal_(p, std=0.02)
        self.apply(_init_vit)

    def _check_image(self, name, t, feat):
        n = feat * self.patch_size
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[-2:]) != (n, n):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be an image [B, 3, {n}, {n}] (the size its positional embedding "
                             f"was built for), got {got}")

    def embed_template(self, template):
        """Patch + positional embedding of one template image ``[B, Lz, C]``: search-independent,
        so `UTPTrackO.track` can reuse it across frames."""
        return self.patch_embed(template) + self.pos_embed_z

    def _blocks(self, x, sz, dz, ce_template_mask, z_indicate_mask):
        B, lx, lz = x.shape[0], x.shape[1], sz.shape[1]
        dev = x.device
        gi_x = index_range(B, 0, lx, dev)
        gi_sz = index_range(B, 0, lz, dev)
        gi_dz = index_range(B, lz, lz + dz.shape[1], dev)
        # the mask and its row count once per forward (a bool mask is read back here, once; nn/ce.py)
        ce_template_mask, count = template_mask(ce_template_mask, B, lz, dev)
        if z_indicate_mask is not None and z_indicate_mask.dtype != torch.bool and not z_indicate_mask.is_floating_point():
            raise TypeError(f"`z_indicate_mask` must be bool or floating, got {z_indicate_mask.dtype}")
        tokens = torch.cat([x, sz, dz], dim=1)
        removed = []
        for i, blk in enumerate(self.blocks):
            tokens, gi_sz, gi_dz, _, _, gi_x, rx, _, ce_template_mask, z_indicate_mask = blk(
                tokens, gi_sz, gi_dz, gi_x, None, ce_template_mask, z_indicate_mask=z_indicate_mask,
                ce_query_count=count)
            if i in self.ce_loc and rx is not None:
                removed.append(rx)
        return self.norm(tokens), gi_x, gi_sz, gi_dz, removed

    def _repad(self, xs, gi_x, removed):
        return VisionTransformerCE._repad(self, xs, gi_x, removed, self.pos_embed_x.shape[1])

    def forward_embedded(self, x_img, sz, dz, ce_template_mask=None, z_indicate_mask=None):
        """The backbone after template embedding: ``sz`` / ``dz`` are `embed_template` outputs."""
        self._check_image("search", x_img, self.feat_sz_x)
        x = self.patch_embed(x_img) + self.pos_embed_x
        tokens, gi_x, gi_sz, gi_dz, removed = self._blocks(x, sz, dz, ce_template_mask, z_indicate_mask)
        lx = gi_x.shape[1]
        xs = tokens[:, :lx]
        if lx != self.pos_embed_x.shape[1]:
            xs = self._repad(xs, gi_x, removed)
        return xs, tokens[:, lx:], {"kept_indexes": [gi_x, gi_sz, gi_dz], "removed_indexes_s": removed}

    def forward(self, template, dynamic_template, search, ce_template_mask=None, z_indicate_mask=None):
        self._check_image("template", template, self.feat_sz_z)
        self._check_image("dynamic_template", dynamic_template, self.feat_sz_z)
        self._check_image("search", search, self.feat_sz_x)
        return self.forward_embedded(search, self.embed_template(template), self.embed_template(dynamic_template),
                                     ce_template_mask, z_indicate_mask)


class FusedUTPTrackOViT(UTPTrackOViT):
    """`UTPTrackOViT` on `FusedUTPTrackOBlock` and `pad_scatter` re-padding; same keys."""

    block_cls = FusedUTPTrackOBlock

    @classmethod
    def from_reference(cls, ref: UTPTrackOViT) -> "FusedUTPTrackOViT":
        if not isinstance(ref, UTPTrackOViT):
            raise TypeError(f"{cls.__name__}.from_reference: `ref` must be a UTPTrackOViT, got {type(ref).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("patch_size", "embed_dim", "feat_sz_z", "feat_sz_x", "ce_loc", "patch_embed", "norm",
                  "cls_token", "pos_embed", "pos_embed_z", "pos_embed_x"):
            setattr(m, k, getattr(ref, k))
        m.blocks = nn.Sequential(*[FusedUTPTrackOBlock.from_reference(b) for b in ref.blocks])
        m.train(ref.training)
        return m

    def _repad(self, xs, gi_x, removed):
        # indices from the selection op: no host read of the CUDA kernel's index check
        return pad_scatter(xs.contiguous(), gi_x, self.pos_embed_x.shape[1], check_index=False)


class UTPTrackO(nn.Module):
    """UTPTrack-O network (reference): `UTPTrackOViT` ``backbone`` + CENTER ``box_head`` on the
    re-padded search tokens.

    forward(template, dynamic_template, search, ce_template_mask=None, z_indicate_mask=None) -> dict
    with ``pred_boxes [B, 1, 4]``, ``score_map``, ``size_map``, ``offset_map``, ``backbone_feat``
    (``[B, Lx + Lsz' + Ldz', C]``: re-padded search tokens, then the kept template tokens),
    ``kept_indexes`` (``[gi_x, gi_sz, gi_dz]``) and ``removed_indexes_s``.
    """

    def __init__(self, backbone: UTPTrackOViT, box_head):
        super().__init__()
        self.backbone, self.box_head = backbone, box_head
        self.feat_sz_s = int(box_head.feat_sz)
        self.feat_len_s = self.feat_sz_s ** 2
        if backbone.feat_sz_x != self.feat_sz_s:
            raise ValueError(f"`box_head.feat_sz` ({self.feat_sz_s}) must equal the search feature size "
                             f"({backbone.feat_sz_x})")

    _head_channels_last = False   # as OSTrack: the reference head gets a contiguous NCHW map

    def _finish(self, xs, zs, aux):
        out = OSTrack.forward_head(self, xs)  # the head reads the last feat_sz^2 tokens: all of xs
        out.update(aux)
        out["backbone_feat"] = torch.cat([xs, zs], dim=1)
        return out

    def forward(self, template, dynamic_template, search, ce_template_mask=None, z_indicate_mask=None):
        return self._finish(*self.backbone(template, dynamic_template, search, ce_template_mask, z_indicate_mask))

    def example_inputs(self, batch=1, dtype=torch.float32, generator=None):
        """Random ``(template, dynamic_template, search, ce_template_mask)`` of this network's sizes;
        the mask is ``"ctr_point"`` (the template centre, as OSTrack-lineage trackers call it)."""
        t, s = self.backbone.feat_sz_z * self.backbone.patch_size, self.backbone.feat_sz_x * self.backbone.patch_size
        imgs = [torch.randn(batch, 3, n, n, generator=generator).to(dtype) for n in (t, t, s)]
        return (*imgs, "ctr_point")

    def track(self, search, template=None, dynamic_template=None, ce_template_mask=None, z_indicate_mask=None,
              cuda_graph=False):
        """Opt-in per-frame API that reuses template work across frames.

        Exactness: only the search-independent part is reused — the patch + positional embedding of
        each template image. Every block mixes template and search tokens in attention, and CE / DTE
        / STE select template tokens with search-dependent scores, so nothing after the embedding
        can be reused exactly. Pass ``template`` / ``dynamic_template`` to (re)set an image
        (a new dynamic template on update frames); ``None`` reuses the cached embedding. The cache
        holds tensors computed with the weights of that call: give the images again after changing
        the weights. The result equals ``forward(last template, last dynamic_template, search,
        ...)`` exactly (same ops on the same values).

        ``cuda_graph=True`` (CUDA tensors only): the step after the template embeddings runs as one
        CUDA-graph replay per input shape (`fasttrack.nn.cuda_graph`; outputs are the capture's
        buffers, overwritten by the next call), with the same values as the eager step;
        ``ce_template_mask`` must then be None, "ctr_point" or an int64 row index.
        """
        bb = self.backbone
        if cuda_graph:
            require_graph_inputs(f"{type(self).__name__}.track", ce_template_mask, search=search, template=template,
                                 dynamic_template=dynamic_template, z_indicate_mask=z_indicate_mask)
        if template is not None:
            bb._check_image("template", template, bb.feat_sz_z)
            self._track_sz = bb.embed_template(template)
        if dynamic_template is not None:
            bb._check_image("dynamic_template", dynamic_template, bb.feat_sz_z)
            self._track_dz = bb.embed_template(dynamic_template)
        sz, dz = getattr(self, "_track_sz", None), getattr(self, "_track_dz", None)
        if sz is None or dz is None:
            raise ValueError("track: pass `template` and `dynamic_template` on the first call")
        if sz.shape[0] != search.shape[0] or dz.shape[0] != search.shape[0]:
            raise ValueError(f"track: `search` has batch {search.shape[0]}, the cached templates "
                             f"{sz.shape[0]} / {dz.shape[0]}")
        if cuda_graph:
            step = self.__dict__.get("_track_graph")
            if step is None:
                step = self.__dict__["_track_graph"] = GraphedStep(self._track_step,
                                                                   name=f"{type(self).__name__}.track")
            return step(search, sz, dz, ce_template_mask, z_indicate_mask)
        return self._track_step(search, sz, dz, ce_template_mask, z_indicate_mask)

    def _track_step(self, search, sz, dz, ce_template_mask, z_indicate_mask):
        return self._finish(*self.backbone.forward_embedded(search, sz, dz, ce_template_mask, z_indicate_mask))

    def __getstate__(self):
        state = super().__getstate__().copy()
        for k in ("_track_sz", "_track_dz", "_track_graph"):
            state.pop(k, None)
        return state


class FusedUTPTrackO(UTPTrackO):
    """`UTPTrackO` with the fused backbone and the BN-folded head (same keys, forward, outputs)."""

    _head_channels_last = True

    @classmethod
    def from_reference(cls, ref: UTPTrackO) -> "FusedUTPTrackO":
        return cls(FusedUTPTrackOViT.from_reference(ref.backbone), FusedCenterPredictor.from_reference(ref.box_head))


def build_utptrack_o(depth=12, head_channels=256, template_size=128, search_size=256, **backbone_kw) -> UTPTrackO:
    """UTPTrack-O on ViT-B/16 at the released pruning locations (`UTPTRACK_O_LOCS`); ``depth`` < 12
    builds a reduced variant (locations beyond it are dropped)."""
    bb = UTPTrackOViT(template_size, search_size, depth=depth, **backbone_kw)
    return UTPTrackO(bb, CenterPredictor(inplanes=bb.embed_dim, channel=head_channels, feat_sz=bb.feat_sz_x,
                                         stride=16))


# --------------------------------------------------------------------------------------------
# patch_model (fasttrack.nn._recognizers): UTPTrack-O / UTPTrack-S pruning blocks
# --------------------------------------------------------------------------------------------
_PRUNING_ARGS = {"global_index_sz", "global_index_dz", "global_index_x"}


def match_utptrack_o_block(m) -> bool:
    return vit_block_parts(m) and _PRUNING_ARGS <= forward_params(m)


def _gi(m, start, n):
    return torch.arange(start, start + n, device=next(m.parameters()).device).expand(2, n)


def probe_utptrack_o_block(m):
    """[search 12 | static z 4 | dynamic z 4], every template row scoring (no mask)."""
    return (probe_like(m, 2, 20, block_dim(m)), _gi(m, 0, 4), _gi(m, 4, 4), _gi(m, 0, 12)), {}


def fused_utptrack_o_block(m) -> FusedUTPTrackOBlock:
    fused_vit_block(m)
    return FusedUTPTrackOBlock.from_reference(m)


def match_utptrack_s_block(m) -> bool:
    return (all(is_linear(m, p) for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.w1", "mlp.w2",
                                           "mlp.w3"))
            and has_attrs(m, "norm1", "norm2", "gamma_1", "gamma_2", "mlp.ffn_ln")
            and _PRUNING_ARGS <= forward_params(m))


def probe_utptrack_s_block(m):
    """[cls | search 12 | static z 4 | dynamic z 4 | text], two templates, no task index."""
    C = m.attn.q_proj.in_features
    return (probe_like(m, 2, 22, C),), dict(global_index_sz=_gi(m, 0, 4), global_index_dz=_gi(m, 4, 4),
                                            global_index_x=_gi(m, 0, 12), num_template=2)


def fused_utptrack_s_block(m) -> FusedUTPTrackSBlock:
    if getattr(m, "postnorm", False) or getattr(m, "deepnorm", False):
        raise TypeError("Fast-iTPN postnorm / deepnorm blocks are not supported by FusedUTPTrackSBlock")
    return FusedUTPTrackSBlock.from_reference(m)


register_recognizer("utptrack_o.block", match_utptrack_o_block, fused_utptrack_o_block, probe=probe_utptrack_o_block)
register_recognizer("utptrack_s.block", match_utptrack_s_block, fused_utptrack_s_block, probe=probe_utptrack_s_block)
