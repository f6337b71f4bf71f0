"""OSTrack with candidate elimination (CE): blocks, the ViT backbone, and the full network.

Restates botaoye/OSTrack (``lib/models/layers/attn_blocks.py::CEBlock``,
``lib/models/ostrack/vit_ce.py::VisionTransformerCE`` after ``finetune_track``,
``lib/models/ostrack/ostrack.py::OSTrack``) with the same constructor arguments, forward signatures
and state-dict keys, so an OSTrack checkpoint's ``net`` dict loads with ``strict=True``.

Reference modules (`CEBlock`, `VisionTransformerCE`, `OSTrack`) follow the official math: explicit
softmax attention, CE scored on the returned attention map through the public `topk_select` op,
re-padding with the official zeros/cat/scatter recipe. Fused modules (`FusedCEBlock`,
`FusedVisionTransformerCE`, `FusedOSTrack`) run SDPA attention, score CE with `topk_select_qk`
(the query rows' attention is recomputed from q and k inside the op, so ``[B, H, N, N]`` is never
built), use pre-packed oneDNN GEMMs with fused GELU / residual epilogues, re-pad with
`pad_scatter`, and fold BatchNorm into the head's convs (`FusedCenterPredictor`). In bf16 / fp16
on CPU the explicit attention core is faster than SDPA (`fasttrack.nn.vit.sdpa_is_faster`); the
fused blocks then score CE on that map with `topk_select`.

Documented differences from the official code (both reference and fused):
- the backbones build global token indices as int64 ``arange`` (OSTrack: float ``linspace``), so
  their removed / kept indices are int64. The blocks accept either: float indices (as OSTrack's
  own backbone passes them, e.g. after `fasttrack.patch_model`) are selected as int64 and
  returned in the caller's dtype.
- ties in the CE score are broken by the lower index (a stable sort); OSTrack's unstable
  ``torch.sort`` leaves them unspecified.
- the fused block returns ``attn=None`` unless ``return_attention`` is set on it (constructor
  argument or attribute), in which case the explicit map is computed and returned and CE scores it
  with `topk_select`, as the reference does. An attention ``mask`` also takes that explicit path,
  because `topk_select_qk` scores unmasked rows.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.ce import (Scorer, active_ratio, ce_query_index, check_index, ctr_point_mask, index_range,
                             official_repad)
from fasttrack.nn.onestream import FusedOneStreamTracker, OneStreamTracker
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
from fasttrack.nn._recognizers import forward_params, probe_like, register_recognizer
from fasttrack.nn.vit import (Block, FusedBlock, FusedPatchEmbed, PatchEmbed, identity_like, patch_tokens, block_dim,
                              call_block, fused_final_norm, fused_vit_block, init_vit_weights, native_plan,
                              share_block_parts, vit_block_parts)
from fasttrack.ops import pad_scatter

__all__ = ["CEBlock", "FusedCEBlock", "PatchEmbed", "VisionTransformerCE", "FusedVisionTransformerCE",
           "OSTrack", "FusedOSTrack", "ce_query_index", "ctr_point_mask", "build_ostrack", "OSTRACK_CONFIGS"]


# --------------------------------------------------------------------------------------------
# CE blocks
# --------------------------------------------------------------------------------------------
class CEBlock(Block):
    """OSTrack ``CEBlock`` (reference): attention, CE of the search tokens, MLP.

    forward(x, global_index_template, global_index_search, mask=None, ce_template_mask=None,
    keep_ratio_search=None) -> (x, global_index_template, global_index_search, removed_index_search,
    attn). Token layout ``[template, search]``; ``removed_index_search`` is None when CE does not run.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, keep_ratio_search=1.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.keep_ratio_search = keep_ratio_search

    def _ce(self, x, scorer, global_index_template, global_index_search, ce_template_mask, keep_ratio_search):
        B = x.shape[0]
        lens_t = global_index_template.shape[1]
        ratio = active_ratio(self.keep_ratio_search, keep_ratio_search)
        if ratio is None:
            return x, global_index_search, None
        # OSTrack's own backbone passes float (linspace) indices: select on int64, hand back its dtype
        idx_dtype = global_index_search.dtype
        gi_s = global_index_search.long() if idx_dtype.is_floating_point else global_index_search
        check_index(gi_s, "global_index_search", B)
        qi = ce_query_index(ce_template_mask, B, lens_t, 0, x.device)
        sel = scorer.select(x, qi, ratio, lens_t, x.shape[1] - lens_t, gi_s)
        if sel is None:
            return x, global_index_search, None
        if idx_dtype == torch.int64:
            return sel.tokens, sel.keep_global, sel.removed_global
        return sel.tokens, sel.keep_global.to(idx_dtype), sel.removed_global.to(idx_dtype)

    def forward(self, x, global_index_template, global_index_search, mask=None, ce_template_mask=None,
                keep_ratio_search=None):
        x_attn, attn = self.attn(self.norm1(x), mask, True)
        x = x + self.drop_path(x_attn)
        x, global_index_search, removed = self._ce(x, Scorer(attn=attn), global_index_template, global_index_search,
                                                   ce_template_mask, keep_ratio_search)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, global_index_template, global_index_search, removed, attn


class FusedCEBlock(FusedBlock):
    """`CEBlock` on SDPA + `topk_select_qk` + packed GEMMs. Same constructor (plus
    ``return_attention``), keys and forward; ``attn`` is None unless ``return_attention`` is True."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, keep_ratio_search=1.0, return_attention=False):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.keep_ratio_search = keep_ratio_search
        self.return_attention = return_attention

    @classmethod
    def from_reference(cls, ref_module, return_attention=False) -> "FusedCEBlock":
        """Share ``ref_module``'s parameters (any module with CEBlock's structure)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        share_block_parts(m, ref_module, cls.__name__)
        m.keep_ratio_search = float(getattr(ref_module, "keep_ratio_search", 1.0))
        m.return_attention = return_attention
        return m

    _ce = CEBlock._ce

    def forward(self, x, global_index_template, global_index_search, mask=None, ce_template_mask=None,
                keep_ratio_search=None, *, native_args=None):
        """``native_args``: this block's `fasttrack.nn.vit.native_plan` entry."""
        if self.return_attention or mask is not None:
            y, attn = self.attn(self.norm1(x), mask, True)
            x = x + self.drop_path(y)
            scorer = Scorer(attn=attn)
        elif active_ratio(self.keep_ratio_search, keep_ratio_search) is None:
            # no elimination in this block: the plain block (one native call where it serves)
            return (FusedBlock.forward(self, x, native_args=native_args), global_index_template, global_index_search,
                    None, None)
        else:
            x, q, k, amap = self.attn_residual(x, native_args=native_args)
            # the map exists when the explicit core ran (bf16 on CPU): scoring it is cheaper
            scorer = Scorer(attn=amap) if amap is not None else Scorer(q=q, k=k, scale=self.attn.scale)
            attn = None
        x, global_index_search, removed = self._ce(x, scorer, global_index_template, global_index_search,
                                                   ce_template_mask, keep_ratio_search)
        x = self.mlp_residual(x, native_args)
        return x, global_index_template, global_index_search, removed, attn


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
def _ce_ratios(depth, ce_loc, ce_keep_ratio):
    ratios = [1.0] * depth
    if ce_loc is not None:
        if ce_keep_ratio is None or len(ce_keep_ratio) != len(ce_loc):
            raise ValueError("`ce_keep_ratio` must give one ratio per entry of `ce_loc`")
        for loc, r in zip(ce_loc, ce_keep_ratio):
            if not 0 <= loc < depth:
                raise ValueError(f"`ce_loc` entry {loc} is outside the {depth} blocks")
            ratios[loc] = float(r)
    return ratios


class VisionTransformerCE(nn.Module):
    """OSTrack's ``VisionTransformerCE`` as it stands after ``finetune_track`` (reference).

    State-dict keys: ``cls_token``, ``pos_embed`` (the pre-training table, ``[1, (224/16)^2 + 1,
    C]``, kept but unused as in OSTrack), ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.*``,
    ``norm.*``, ``pos_embed_z`` ``[1, (template_size/16)^2, C]``, ``pos_embed_x``. Only the
    ``cat_mode='direct'`` layout ``[z, x]`` without cls token or separate segment embeddings — the
    released OSTrack configurations.

    forward(z, x, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False) ->
    ``(tokens [B, Lz + Lx, C], {"attn", "removed_indexes_s"})`` with the search tokens re-padded to
    their original positions (zeros where eliminated).
    """

    block_cls = CEBlock

    def __init__(self, template_size=128, search_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 ce_loc=(3, 6, 9), ce_keep_ratio=(0.7, 0.7, 0.7), pretrain_img_size=224, norm_layer=None,
                 act_layer=None):
        super().__init__()
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size % patch_size:
                raise ValueError(f"`{name}` ({size}) must be a multiple of `patch_size` ({patch_size})")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.feat_sz_z = template_size // patch_size
        self.feat_sz_x = search_size // patch_size
        self.ce_loc = None if ce_loc is None else list(ce_loc)
        self.patch_embed = PatchEmbed(pretrain_img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace, meta-device safe
        self.blocks = nn.Sequential(*[
            self.block_cls(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
                           keep_ratio_search=r)
            for i, r in enumerate(_ce_ratios(depth, ce_loc, ce_keep_ratio))])
        self.norm = norm_layer(embed_dim)
        self.pos_embed_z = nn.Parameter(torch.zeros(1, self.feat_sz_z ** 2, embed_dim))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, self.feat_sz_x ** 2, embed_dim))
        for p in (self.cls_token, self.pos_embed, self.pos_embed_z, self.pos_embed_x):
            trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)

    def embed_template(self, z):
        """``patch_embed(z) + pos_embed_z`` ``[B, Lz, C]``: the search-independent part of the
        forward, which `OSTrack.track` reuses across frames."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[-1] // self.patch_size != self.feat_sz_z:
            got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"`z` must be an image [B, 3, {self.feat_sz_z * self.patch_size}, "
                             f"{self.feat_sz_z * self.patch_size}] (the size pos_embed_z was built for), got {got}")
        return patch_tokens(self.patch_embed, z, self.pos_embed_z)

    def _embed(self, z, x, z_tokens=None):
        if x.dim() != 4 or (z_tokens is None and z.dim() != 4):
            raise ValueError(f"`z` and `x` must be images [B, 3, H, W], got {list(z.shape) if z is not None else None} "
                             f"and {list(x.shape)}")
        if (z_tokens is None and z.shape[-1] // self.patch_size != self.feat_sz_z) \
                or x.shape[-1] // self.patch_size != self.feat_sz_x:
            raise ValueError(f"`z` / `x` must be {self.feat_sz_z * self.patch_size} / "
                             f"{self.feat_sz_x * self.patch_size} px "
                             f"(the sizes pos_embed_z / pos_embed_x were built for), got "
                             f"{None if z is None else z.shape[-1]} / {x.shape[-1]}")
        x = patch_tokens(self.patch_embed, x, self.pos_embed_x)
        z = self.embed_template(z) if z_tokens is None else z_tokens
        tokens = torch.cat([z, x], dim=1)
        return tokens if identity_like(self.pos_drop) else self.pos_drop(tokens)

    def _run_blocks(self, tokens, ce_template_mask, ce_keep_rate):
        B, dev = tokens.shape[0], tokens.device
        lens_z, lens_x = self.pos_embed_z.shape[1], self.pos_embed_x.shape[1]
        gi_t = index_range(B, 0, lens_z, dev)
        gi_s = index_range(B, 0, lens_x, dev)
        # the query rows once per forward (a bool mask is read back here, once; see nn/ce.py)
        rows = ce_query_index(ce_template_mask, B, lens_z, 0, dev) if self.ce_loc else None
        removed, attn = [], None
        for i, (blk, planned) in enumerate(zip(self.blocks, native_plan(self.blocks, tokens))):
            tokens, gi_t, gi_s, rem, attn = call_block(blk, planned, tokens, gi_t, gi_s, None, rows, ce_keep_rate)
            if self.ce_loc is not None and i in self.ce_loc:
                removed.append(rem)
        return self.final_norm(tokens), gi_t, gi_s, removed, attn

    def final_norm(self, x):
        """``norm(x)`` after the last block."""
        return self.norm(x)

    def forward(self, z, x, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False, z_tokens=None):
        """``z_tokens`` (fasttrack extension): an `embed_template` result used instead of ``z``."""
        # return_last_attn is accepted and ignored, as in OSTrack
        tokens, gi_t, gi_s, removed, attn = self._run_blocks(self._embed(z, x, z_tokens), ce_template_mask,
                                                             ce_keep_rate)
        lens_z, lens_x = gi_t.shape[1], self.pos_embed_x.shape[1]
        zt, xs = tokens[:, :lens_z], tokens[:, lens_z:]
        if removed and removed[0] is not None:
            xs = official_repad(xs, gi_s, [r for r in removed if r is not None], lens_x)
        return torch.cat([zt, xs], dim=1), {"attn": attn, "removed_indexes_s": removed}


class FusedVisionTransformerCE(VisionTransformerCE):
    """`VisionTransformerCE` with `FusedCEBlock` blocks and `pad_scatter` re-padding. Same keys;
    `from_reference` shares a reference backbone's parameters."""

    block_cls = FusedCEBlock
    final_norm = fused_final_norm

    @classmethod
    def from_reference(cls, ref: VisionTransformerCE) -> "FusedVisionTransformerCE":
        if not isinstance(ref, VisionTransformerCE):
            raise TypeError(f"{cls.__name__}.from_reference: `ref` must be a VisionTransformerCE, "
                            f"got {type(ref).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("patch_size", "embed_dim", "num_features", "feat_sz_z", "feat_sz_x", "ce_loc"):
            setattr(m, k, getattr(ref, k))
        for k in ("pos_drop", "norm"):
            setattr(m, k, getattr(ref, k))
        m.patch_embed = FusedPatchEmbed.from_reference(ref.patch_embed)
        for k in ("cls_token", "pos_embed", "pos_embed_z", "pos_embed_x"):
            setattr(m, k, getattr(ref, k))
        m.blocks = nn.Sequential(*[FusedCEBlock.from_reference(b) for b in ref.blocks])
        m.train(ref.training)
        return m

    def forward_split(self, z, x, ce_template_mask=None, ce_keep_rate=None, z_tokens=None):
        """``(template tokens [B, Lz', C], kept search tokens [B, k, C], their global indices
        [B, k], removed index list, attn)`` after the final norm, before re-padding."""
        tokens, gi_t, gi_s, removed, attn = self._run_blocks(self._embed(z, x, z_tokens), ce_template_mask,
                                                             ce_keep_rate)
        lens_z = gi_t.shape[1]
        return tokens[:, :lens_z], tokens[:, lens_z:], gi_s, removed, attn

    def forward(self, z, x, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False, z_tokens=None):
        zt, xs, gi_s, removed, attn = self.forward_split(z, x, ce_template_mask, ce_keep_rate, z_tokens)
        lens_x = self.pos_embed_x.shape[1]
        if xs.shape[1] != lens_x:
            # the indices come from the selection op: no host read of the CUDA kernel's index check
            # (CPU kernels check while they read, for free)
            xs = pad_scatter(xs.contiguous(), gi_s, lens_x, check_index=False)
        return torch.cat([zt, xs], dim=1), {"attn": attn, "removed_indexes_s": removed}


# --------------------------------------------------------------------------------------------
# Full network
# --------------------------------------------------------------------------------------------
class OSTrack(OneStreamTracker):
    """OSTrack network (reference): `VisionTransformerCE` ``backbone`` + CENTER ``box_head``
    (`fasttrack.nn.onestream.OneStreamTracker`: forward, forward_head, track)."""


class FusedOSTrack(FusedOneStreamTracker, OSTrack):
    """`OSTrack` with the fused backbone and box head (same keys, forward and outputs)."""

    @classmethod
    def from_reference(cls, ref: OSTrack) -> "FusedOSTrack":
        return cls(FusedVisionTransformerCE.from_reference(ref.backbone),
                   FusedCenterPredictor.from_reference(ref.box_head))


OSTRACK_CONFIGS = {
    # name: (template_size, search_size) with ViT-B/16, CE at 3/6/9 keep 0.7
    "vitb_256_mae_ce": (128, 256),
    "vitb_384_mae_ce": (192, 384),
}


def build_ostrack(config="vitb_256_mae_ce", fused=False, depth=12, head_channels=256, **backbone_kw):
    """An OSTrack network for a released configuration (`OSTRACK_CONFIGS`); ``depth`` < 12 builds a
    reduced test variant (CE locations beyond the depth are dropped)."""
    if config not in OSTRACK_CONFIGS:
        raise ValueError(f"build_ostrack: `config` must be one of {sorted(OSTRACK_CONFIGS)}, got {config!r}")
    t, s = OSTRACK_CONFIGS[config]
    ce = [(i, 0.7) for i in (3, 6, 9) if i < depth]
    kw = dict(template_size=t, search_size=s, depth=depth, ce_loc=[i for i, _ in ce],
              ce_keep_ratio=[r for _, r in ce])
    kw.update(backbone_kw)
    ref = OSTrack(VisionTransformerCE(**kw), CenterPredictor(inplanes=kw.get("embed_dim", 768), channel=head_channels,
                                                              feat_sz=s // 16, stride=16))
    return FusedOSTrack.from_reference(ref) if fused else ref


# --------------------------------------------------------------------------------------------
# patch_model (fasttrack.nn._recognizers): OSTrack's CEBlock (official or this module's)
# --------------------------------------------------------------------------------------------
def match_ce_block(m) -> bool:
    return vit_block_parts(m) and {"global_index_template", "global_index_search"} <= forward_params(m)


def probe_ce_block(m):
    """4 template + 12 search tokens, the block's own keep ratio (OSTrack's backbone passes float
    global indices)."""
    gi_t = torch.arange(4.0, device=m.attn.qkv.weight.device).expand(2, 4)
    gi_s = torch.arange(12.0, device=m.attn.qkv.weight.device).expand(2, 12)
    return (probe_like(m, 2, 16, block_dim(m)), gi_t, gi_s), {}


def fused_ce_block(m) -> FusedCEBlock:
    fused_vit_block(m)    # the same refusals as a plain block (explicit attention path)
    return FusedCEBlock.from_reference(m)


register_recognizer("ostrack.ce_block", match_ce_block, fused_ce_block, probe=probe_ce_block)
