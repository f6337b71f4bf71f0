"""AVTrack (Adaptive ViT tracking; the public code of ABTrack's lab, wuyou3474/AVTrack): a ViT whose
blocks 2.. are gated per frame, reference and fused.

Restated from ``lib/models/avtrack/vision_transformer.py`` (timm ``Block`` + ``active_score_module``,
``VisionTransformer.forward_features``) with the same attribute names, forward signatures and
state-dict keys, so an AVTrack checkpoint's backbone (``backbone.*`` of its ``net`` dict, see
`backbone_state`) loads with ``strict=True``:

- every block is a pre-norm ViT block (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
  ``mlp.fc1``, ``mlp.fc2``) plus ``active_score_module = Linear(num_tokens, 1)`` (320 = 64 template +
  256 search tokens at 128 / 256 px), even blocks 0 and 1, which never use it;
- the gate reads *channel 0 of every token*: ``p = sigmoid(gate(x[:, :, 0]))`` ``[B, 1]``;
- blocks 0 and 1 always run; block i > 1 (unless ``is_distill``, the 6-block distilled configs)
  runs where ``p > 0.5``: in training on the passing samples only (``x[idx] = blk(x[idx])``), in
  eval on the *whole batch* if any sample passes (``len(idx) > 0``), else not at all;
- ``forward(z, x, tnc_keep_rate=None, return_last_attn=False, is_distill=False)`` returns
  ``(norm(tokens) [B, 320, C], {"attn": None, "probs_active": [p of each gated block]})``; the
  sequence is ``[z, x]`` with no cls token (``cls_token`` / ``pos_embed`` are kept, unused).

Fused (`FusedAVTrackBlock`, `FusedAVTrackViT`): SDPA blocks with packed GEMMs sharing the official
parameters, the gate kept. Execution of a gated block in eval, by dispatch rule (``per_sample``):
- ``False`` (default, the official semantics): on CPU tensors the decision is read on the host (free
  there) and the block runs on the whole batch or not at all; on other devices nothing is read back:
  the block runs and ``torch.where(any(p > 0.5), block(x), x)`` selects (so a skipped block costs its
  compute there, and the forward stays capturable in a CUDA graph);
- ``True`` (opt-in): only the samples with ``p > 0.5`` run it (compacted on CPU, selected per sample
  elsewhere). For a batch whose samples disagree this differs from the official output (the official
  code runs the block on every sample when any passes); at batch 1 the two are identical.
``samples_run`` counts the samples the inner blocks ran on (``reset_counters()``).

Unsupported, and refused by `patch_model` (named in its report): timm's non-SDPA attention path
(``attn.fused_attn = False``), where AVTrack's code adds ``0.1 * attn ** 2`` to the probabilities; the
EVA-02 backbone variant (``eva.py``: rope, SwiGLU).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fasttrack._validate import module_error
from fasttrack.nn._recognizers import has_attrs, probe_like, register_recognizer
from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.vit import (Block, FusedBlock, FusedPatchEmbed, PatchEmbed, block_dim, fused_vit_block,
                              init_vit_weights, patch_tokens,
                              share_block_parts, vit_block_parts)

__all__ = ["AVTrackBlock", "FusedAVTrackBlock", "AVTrackViT", "FusedAVTrackViT", "backbone_state"]


_err = module_error(__name__)


class AVTrackBlock(Block):
    """A pre-norm ViT block with AVTrack's (unused here) gate ``active_score_module``; ``forward(x)``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, num_tokens=320):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act_layer, norm_layer)
        self.active_score_module = nn.Linear(num_tokens, 1)

    def forward(self, x):
        return super().forward(x)


class FusedAVTrackBlock(FusedBlock):
    """`AVTrackBlock` on SDPA and packed GEMMs; shares the block's parameters and its gate."""

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedAVTrackBlock":
        gate = getattr(ref_module, "active_score_module", None)
        if not isinstance(gate, nn.Linear) or gate.out_features != 1:
            raise TypeError(f"{cls.__name__}.from_reference: `active_score_module` must be an nn.Linear(num_tokens, 1)")
        fused_vit_block(ref_module)    # refuses the non-SDPA attention path (AVTrack's 0.1 * attn**2 quirk)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        share_block_parts(m, ref_module, cls.__name__)
        m.active_score_module = gate
        return m

    def forward(self, x):
        return super().forward(x)


def _gate_probability(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(active_score_module(x[:, :, 0]))`` ``[B, 1]`` (the official reads channel 0 of every token)."""
    return blk.active_score_module(x[:, :, 0]).sigmoid()


class AVTrackViT(nn.Module):
    """AVTrack's ViT backbone (reference; module docstring). Keys: ``cls_token``, ``pos_embed``,
    ``pos_embed_z``, ``pos_embed_x``, ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.*``
    (`AVTrackBlock`), ``norm.{weight,bias}``."""

    block_cls = AVTrackBlock

    def __init__(self, template_size=128, search_size=256, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, pretrain_size=224):
        super().__init__()
        who = type(self).__name__
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size % patch_size:
                raise _err(who, f"`{name}` ({size}) must be a multiple of patch_size={patch_size}")
        self.config = dict(template_size=template_size, search_size=search_size, patch_size=patch_size,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, pretrain_size=pretrain_size)
        C = self.embed_dim = embed_dim
        lz, lx = (template_size // patch_size) ** 2, (search_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(pretrain_size, patch_size, 3, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (pretrain_size // patch_size) ** 2, C))
        self.pos_embed_z = nn.Parameter(torch.zeros(1, lz, C))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, lx, C))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block = partial(self.block_cls, dim=C, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_tokens=lz + lx)
        self.blocks = nn.Sequential(*[block(drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        for p in (self.cls_token, self.pos_embed, self.pos_embed_z, self.pos_embed_x):
            trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)
        self.samples_run = 0

    def reset_counters(self) -> None:
        self.samples_run = 0

    def _embed(self, z, x):
        who = type(self).__name__
        for name, t, pe in (("z", z, self.pos_embed_z), ("x", x, self.pos_embed_x)):
            n = int(round(pe.shape[1] ** 0.5)) * self.patch_embed.proj.kernel_size[0]
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != (3, n, n):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise _err(who, f"`{name}` must be images [B, 3, {n}, {n}], got {got}")
        if z.shape[0] != x.shape[0]:
            raise _err(who, f"`z` and `x` batch sizes differ ({z.shape[0]} vs {x.shape[0]})")
        return torch.cat([patch_tokens(self.patch_embed, z, self.pos_embed_z),
                          patch_tokens(self.patch_embed, x, self.pos_embed_x)], dim=1)

    def _gated(self, i, blk, x, prob):
        """Block i > 1 under its gate, as the official ``forward_features``."""
        passing = (prob > 0.5).squeeze(1)
        idx = passing.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        if self.training:
            x = x.clone()
            x[idx] = blk(x[idx])
            self.samples_run += int(idx.numel())
            return x
        self.samples_run += x.shape[0]
        return blk(x)

    def forward(self, z, x, tnc_keep_rate=None, return_last_attn=False, is_distill=False):
        t = self._embed(z, x)
        probs = []
        for i, blk in enumerate(self.blocks):
            if i > 1 and not is_distill:
                prob = _gate_probability(blk, t)
                t = self._gated(i, blk, t, prob)
                probs.append(prob)
            else:
                t = blk(t)
                self.samples_run += t.shape[0]
        return self.norm(t), {"attn": None, "probs_active": probs}


class FusedAVTrackViT(AVTrackViT):
    """`AVTrackViT` on `FusedAVTrackBlock` s, with the documented dispatch rule for gated blocks
    (module docstring; ``per_sample`` opt-in). Same keys and forward."""

    def __init__(self, *args, per_sample: bool = False, **kw):
        super().__init__(*args, **kw)
        self.blocks = nn.Sequential(*[FusedAVTrackBlock.from_reference(b) for b in self.blocks])
        self.per_sample = bool(per_sample)

    @classmethod
    def from_reference(cls, ref: nn.Module, per_sample: bool = False) -> "FusedAVTrackViT":
        """Share ``ref``'s parameters: `AVTrackViT` or the official AVTrack ``VisionTransformer``."""
        who = f"{cls.__name__}.from_reference"
        if not _looks_like_avtrack(ref):
            raise TypeError(f"{who}: `ref` ({type(ref).__name__}) lacks the AVTrack backbone structure "
                            "(patch_embed, pos_embed_z, pos_embed_x, norm, gated blocks)")
        for name in ("norm_pre", "fc_norm"):
            sub = getattr(ref, name, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                raise TypeError(f"{who}: `{name}` is {type(sub).__name__}; the tracking forward has it as Identity")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("norm", "cls_token", "pos_embed", "pos_embed_z", "pos_embed_x"):
            setattr(m, k, getattr(ref, k))
        m.patch_embed = FusedPatchEmbed.from_reference(ref.patch_embed)
        m.blocks = nn.Sequential(*[FusedAVTrackBlock.from_reference(b) for b in ref.blocks])
        m.embed_dim = m.pos_embed_z.shape[-1]
        m.config = dict(getattr(ref, "config", {}))
        m.per_sample = bool(per_sample)
        m.samples_run = 0
        m.train(ref.training)
        return m

    def _gated(self, i, blk, x, prob):
        if self.training:
            return super()._gated(i, blk, x, prob)
        passing = (prob > 0.5).squeeze(1)
        if not x.is_cpu:   # no host read: the block runs, the decision selects on the device
            keep = passing[:, None, None] if self.per_sample else passing.any()
            self.samples_run += x.shape[0]
            return torch.where(keep, blk(x), x)
        if not self.per_sample:
            return super()._gated(i, blk, x, prob)
        idx = passing.nonzero().squeeze(1)
        n = int(idx.numel())
        self.samples_run += n
        if n == x.shape[0]:
            return blk(x)
        if n == 0:
            return x
        return x.index_copy(0, idx, blk(x.index_select(0, idx)))


def backbone_state(net_state: dict, prefix: str = "backbone.") -> dict:
    """The backbone part of an AVTrack checkpoint's ``net`` dict (keys without ``prefix``)."""
    return {k[len(prefix):]: v for k, v in net_state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# patch_model (fasttrack.nn._recognizers): AVTrack's backbone, or its blocks alone
# --------------------------------------------------------------------------------------------
def _is_gated_block(b) -> bool:
    return vit_block_parts(b) and isinstance(getattr(b, "active_score_module", None), nn.Linear)


def _looks_like_avtrack(m) -> bool:
    blocks = getattr(m, "blocks", None)
    return (has_attrs(m, "patch_embed.proj", "pos_embed_z", "pos_embed_x", "norm")
            and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
            and all(_is_gated_block(b) for b in blocks))


def _probe_images(m):
    patch = m.patch_embed.proj.kernel_size[0]
    side = lambda pe: int(round(pe.shape[1] ** 0.5)) * patch  # noqa: E731
    return (probe_like(m, 2, 3, side(m.pos_embed_z), side(m.pos_embed_z)),
            probe_like(m, 2, 3, side(m.pos_embed_x), side(m.pos_embed_x))), {}


register_recognizer("avtrack.backbone", _looks_like_avtrack, FusedAVTrackViT.from_reference, probe=_probe_images)
register_recognizer("avtrack.block", _is_gated_block, FusedAVTrackBlock.from_reference,
                    probe=lambda m: ((probe_like(m, 2, m.active_score_module.in_features, block_dim(m)),), {}),
                    before="vit.block")
