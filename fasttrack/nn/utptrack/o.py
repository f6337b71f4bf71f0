"""UTPTrack-O: OSTrack's ViT-B/16 with UTPTrack's pruning blocks (CE on the search tokens, DTE / STE
on the dynamic / static template tokens) and the CENTER head. The rule: `fasttrack.nn.utptrack`."""

from __future__ import annotations

import torch
from torch import nn

from functools import partial

from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.ce import Scorer, active_ratio, index_range, official_repad, template_mask
from fasttrack.nn.cuda_graph import GraphedStep, require_graph_inputs
from fasttrack.nn.derived import TransientState
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
from fasttrack.nn.onestream import OneStreamTracker
from fasttrack.nn._recognizers import forward_params, probe_like, register_recognizer
from fasttrack.ops import pad_scatter
from fasttrack.nn.vit import (
    Block, FusedBlock, FusedPatchEmbed, PatchEmbed, block_dim, fused_vit_block, patch_tokens,
    call_block, fused_final_norm, init_vit_weights, native_plan, share_block_parts, vit_block_parts,
)
from fasttrack.nn.utptrack.pruning import PRUNING_ARGS, UTPTRACK_O_LOCS, block_outputs, probe_index, prune_groups

__all__ = ["UTPTrackOBlock", "FusedUTPTrackOBlock", "UTPTrackOViT", "FusedUTPTrackOViT", "UTPTrackO",
           "FusedUTPTrackO", "build_utptrack_o"]


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
        return block_outputs((x,) + res[1:], attn)


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
                keep_ratio_x=None, keep_ratio_dz=None, keep_ratio_sz=None, z_indicate_mask=None, ce_query_count=None,
                *, native_args=None):
        """``native_args``: this block's `fasttrack.nn.vit.native_plan` entry."""
        if self.return_attention or mask is not None:
            y, attn = self.attn(self.norm1(x), mask, True)
            x, scorer = x + self.drop_path(y), Scorer(attn=attn)
        elif all(active_ratio(own, given) is None for own, given in ((self.keep_ratio_x, keep_ratio_x),
                                                                     (self.keep_ratio_dz, keep_ratio_dz),
                                                                     (self.keep_ratio_sz, keep_ratio_sz))):
            # nothing pruned in this block: `_prune` only checks the layout (it reads no token), then
            # the plain block (one native call where it serves)
            res = self._prune(x, None, global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                              keep_ratio_x, keep_ratio_dz, keep_ratio_sz, z_indicate_mask, ce_query_count)
            return block_outputs((FusedBlock.forward(self, x, native_args=native_args),) + res[1:], None)
        else:
            x, q, k, amap = self.attn_residual(x, native_args=native_args)
            scorer = Scorer(attn=amap) if amap is not None else Scorer(q=q, k=k, scale=self.attn.scale)
            attn = None
        res = self._prune(x, scorer, global_index_sz, global_index_dz, global_index_x, ce_template_mask,
                          keep_ratio_x, keep_ratio_dz, keep_ratio_sz, z_indicate_mask, ce_query_count)
        return block_outputs((self.mlp_residual(res[0], native_args),) + res[1:], attn)


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
        self.apply(init_vit_weights)

    def _check_image(self, name, t, feat):
        n = feat * self.patch_size
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[-2:]) != (n, n):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be an image [B, 3, {n}, {n}] (the size its positional embedding "
                             f"was built for), got {got}")

    def embed_template(self, template):
        """Patch + positional embedding of one template image ``[B, Lz, C]``: search-independent,
        so `UTPTrackO.track` can reuse it across frames."""
        return patch_tokens(self.patch_embed, template, self.pos_embed_z)

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
        for i, (blk, planned) in enumerate(zip(self.blocks, native_plan(self.blocks, tokens))):
            tokens, gi_sz, gi_dz, _, _, gi_x, rx, _, ce_template_mask, z_indicate_mask = call_block(
                blk, planned, tokens, gi_sz, gi_dz, gi_x, None, ce_template_mask, z_indicate_mask=z_indicate_mask,
                ce_query_count=count)
            if i in self.ce_loc and rx is not None:
                removed.append(rx)
        return self.final_norm(tokens), gi_x, gi_sz, gi_dz, removed

    def final_norm(self, x):
        """``norm(x)`` after the last block."""
        return self.norm(x)

    def _repad(self, xs, gi_x, removed):
        return official_repad(xs, gi_x, removed, self.pos_embed_x.shape[1])

    def forward_embedded(self, x_img, sz, dz, ce_template_mask=None, z_indicate_mask=None):
        """The backbone after template embedding: ``sz`` / ``dz`` are `embed_template` outputs."""
        self._check_image("search", x_img, self.feat_sz_x)
        x = patch_tokens(self.patch_embed, x_img, self.pos_embed_x)
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
    final_norm = fused_final_norm

    @classmethod
    def from_reference(cls, ref: UTPTrackOViT) -> "FusedUTPTrackOViT":
        if not isinstance(ref, UTPTrackOViT):
            raise TypeError(f"{cls.__name__}.from_reference: `ref` must be a UTPTrackOViT, got {type(ref).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("patch_size", "embed_dim", "feat_sz_z", "feat_sz_x", "ce_loc", "norm",
                  "cls_token", "pos_embed", "pos_embed_z", "pos_embed_x"):
            setattr(m, k, getattr(ref, k))
        m.patch_embed = FusedPatchEmbed.from_reference(ref.patch_embed)
        m.blocks = nn.Sequential(*[FusedUTPTrackOBlock.from_reference(b) for b in ref.blocks])
        m.train(ref.training)
        return m

    def _repad(self, xs, gi_x, removed):
        # indices from the selection op: no host read of the CUDA kernel's index check
        return pad_scatter(xs.contiguous(), gi_x, self.pos_embed_x.shape[1], check_index=False)


class UTPTrackO(TransientState, nn.Module):
    """UTPTrack-O network (reference): `UTPTrackOViT` ``backbone`` + CENTER ``box_head`` on the
    re-padded search tokens.

    forward(template, dynamic_template, search, ce_template_mask=None, z_indicate_mask=None) -> dict
    with ``pred_boxes [B, 1, 4]``, ``score_map``, ``size_map``, ``offset_map``, ``backbone_feat``
    (``[B, Lx + Lsz' + Ldz', C]``: re-padded search tokens, then the kept template tokens),
    ``kept_indexes`` (``[gi_x, gi_sz, gi_dz]``) and ``removed_indexes_s``.
    """

    _transient = ("_track_sz", "_track_dz", "_track_graph")

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
        out = OneStreamTracker.forward_head(self, xs)  # the head reads the last feat_sz^2 tokens: all of xs
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
    return vit_block_parts(m) and PRUNING_ARGS <= forward_params(m)


def probe_utptrack_o_block(m):
    """[search 12 | static z 4 | dynamic z 4], every template row scoring (no mask)."""
    return (probe_like(m, 2, 20, block_dim(m)), probe_index(m, 0, 4), probe_index(m, 4, 4), probe_index(m, 0, 12)), {}


def fused_utptrack_o_block(m) -> FusedUTPTrackOBlock:
    fused_vit_block(m)
    return FusedUTPTrackOBlock.from_reference(m)


register_recognizer("utptrack_o.block", match_utptrack_o_block, fused_utptrack_o_block, probe=probe_utptrack_o_block)
