"""ABTrack: adaptive bypassing of ViT blocks (Yang et al., "Adaptively Bypassing Vision Transformer
Blocks for Efficient Visual Tracking") on a dimension-pruned ViT.

ABTrack's code is not public; this module states the design from the paper and fixes what the
paper leaves open (marked *choice*).

`BypassBlock` wraps one ViT block. The token sequence carries a learnable *bypass token* as its
last token. The gate reads it: ``p = sigmoid(gate(x[:, -1]))`` (``gate = Linear(C, 1)``), and
the block is skipped for the samples where ``p > rho`` (default 0.5): their tokens pass through
unchanged. Enforced blocks (the backbone's first ``n_enf``) always run and have no gate.

Execution (same values in every mode):
- reference (`BypassBlock`): runs the block on the whole batch and selects per sample — what
  gating trackers do, and why they gain nothing in batches;
- fused (`FusedBypassBlock`), inference, *compacting*: runs the block only on the samples that are
  not skipped (compact with ``index_select``, run, ``index_copy`` back); nothing runs when all skip.
  Which samples run is read on the host, which costs nothing on a CPU;
- fused, *static*: runs the block on the whole batch and selects with ``torch.where`` — no
  data-dependent shapes and no host read, so it suits ``torch.export`` / ONNX, GPUs (a host read
  would stall the stream) and CUDA graphs. Dispatch rule (``static`` argument): ``None`` (default)
  compacts on CPU tensors and is static on any other device and while a graph is captured
  (`fasttrack.backend.capturing_graph`: compile, export); ``True`` / ``False`` force one;
- training (both): the hard decision with a straight-through gradient (*choice*):
  ``g = 1[p > rho] + p − p.detach()``, ``out = g·x + (1 − g)·block(x)``, so the forward value is
  the hard selection and the gate learns; the block runs on the whole batch (its output is needed
  for every sample's gate gradient).
``samples_run`` counts the samples the inner block ran on (``reset_counters()`` clears it).

`ABTrackBackbone`: OSTrack's ViT-B/16 embedding (``patch_embed``, ``pos_embed_z``,
``pos_embed_x``; ``cls_token``/``pos_embed`` kept from pre-training, unused), the sequence
``[z, x, bypass]`` (*choice*: the bypass token has no position embedding), ``depth`` blocks each
wrapped in a `BypassBlock` (the first ``n_enf`` enforced; *choice*: default ``n_enf = 4``), the
final ``norm``, and the output ``[z, x]`` tokens (the bypass token dropped).

Dimension pruning (`fasttrack.nn.pruned` states which linears each mask prunes): `apply_pruning`
takes each block's kept dims (D1 for attention, D2 for the MLP; `fasttrack.prune.select_kept`);
the reference inner blocks become `MaskedBlock` (dense weights times the 0/1 masks — what ABTrack
trains), the fused inner blocks `PrunedBlock` (weights stored ``[d_out, d*]``, LayerNorm fused into
the pruned qkv / fc1 GEMMs). `FusedABTrackBackbone.from_reference` converts masked blocks to pruned
ones (kept columns copied; norms, biases, fc2 shared) and shares everything else. `build_abtrack`
builds a pruned backbone (keep 0.7 by default).

Keys (``<inner>`` = ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2`` ``.{weight, bias}``)::

    patch_embed.proj.{weight, bias}  cls_token  pos_embed  pos_embed_z  pos_embed_x  bypass_token [1, 1, C]
    blocks.{i}.block.<inner>                   dense: weights [d_out, d_in]
        + blocks.{i}.block.{mask1, mask2} [C]  reference, pruned (masked dense)
        or blocks.{i}.block.{attn.qkv, attn.proj, mlp.fc1}.in_index [d*], weights [d_out, d*]: fused, pruned
    blocks.{i}.gate.{weight [1, C], bias [1]}  i >= n_enf
    norm.{weight, bias}
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack._validate import module_error
from fasttrack.backend import capturing_graph
from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.twin import twin_from_reference
from fasttrack.nn.pruned import MaskedBlock, PrunedBlock
from fasttrack.nn.vit import Block, FusedBlock, FusedPatchEmbed, PatchEmbed, init_vit_weights, patch_tokens
from fasttrack.nn._recognizers import probe_like, register_recognizer
from fasttrack.prune import masked_block, prune_block, select_kept

__all__ = ["BypassBlock", "FusedBypassBlock", "ABTrackBackbone", "FusedABTrackBackbone", "fuse_inner_block",
           "build_abtrack"]


_err = module_error(__name__)


def fuse_inner_block(block: nn.Module) -> nn.Module:
    """The fused form of an inner block, sharing its Parameters where the layouts allow:
    `MaskedBlock` (masked dense) → `PrunedBlock` (kept weight columns copied; norms, biases and
    fc2 shared); `Block` → `FusedBlock` (shared); `PrunedBlock` / `FusedBlock` are kept."""
    if isinstance(block, (PrunedBlock, FusedBlock)):
        return block
    if isinstance(block, MaskedBlock):
        return prune_block(block, _kept(block.mask1, "mask1"), _kept(block.mask2, "mask2"))
    if type(block) is Block:
        return FusedBlock.from_reference(block)
    raise TypeError(f"fuse_inner_block: no fused form known for `block` of type {type(block).__name__}")


def _kept(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"fuse_inner_block: `{name}` must be a 0/1 mask")
    return mask.nonzero().flatten()


class BypassBlock(nn.Module):
    """A ViT block with ABTrack's bypass gate (reference: runs the whole batch; module doc).

    ``forward(x [B, N, C])`` → ``(x [B, N, C], skipped [B] bool)``; the last token of ``x`` is the
    bypass token.
    """

    def __init__(self, block: nn.Module, dim: int, rho: float = 0.5, enforce: bool = False):
        super().__init__()
        who = type(self).__name__
        if not isinstance(block, nn.Module):
            raise TypeError(f"{who}: `block` must be an nn.Module, got {type(block).__name__}")
        if not 0.0 < float(rho) < 1.0:
            raise _err(who, f"`rho` must be in (0, 1), got {rho!r}")
        self.block = block
        self.gate = None if enforce else nn.Linear(dim, 1)
        self.dim, self.rho, self.enforce = dim, float(rho), bool(enforce)
        self.samples_run = 0

    def reset_counters(self) -> None:
        self.samples_run = 0

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise _err(type(self).__name__, f"`x` must be tokens [B, N, {self.dim}] ending with the bypass token, "
                                            f"got {got}")

    def gate_probability(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(gate(bypass token))`` ``[B]`` in float32."""
        return torch.sigmoid(F.linear(x[:, -1], self.gate.weight, self.gate.bias).float()).squeeze(-1)

    def _select(self, x, y, p):
        skip = p > self.rho
        if self.training:
            g = (skip.float() + p - p.detach()).to(x.dtype)[:, None, None]
            return g * x + (1 - g) * y, skip
        return torch.where(skip[:, None, None], x, y), skip

    def forward(self, x):
        self._check(x)
        if self.enforce:
            self.samples_run += x.shape[0]
            return self.block(x), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        p = self.gate_probability(x)
        self.samples_run += x.shape[0]
        return self._select(x, self.block(x), p)


class FusedBypassBlock(BypassBlock):
    """`BypassBlock` that runs its (fused) block only on the samples that are not skipped, or on
    all of them and selects when ``static`` is set (module doc)."""

    def __init__(self, block: nn.Module, dim: int, rho: float = 0.5, enforce: bool = False,
                 static: bool | None = None):
        super().__init__(fuse_inner_block(block), dim, rho, enforce)
        self.static = None if static is None else bool(static)

    def runs_static(self, x: torch.Tensor) -> bool:
        """The dispatch rule (module doc): whole batch + select, or compaction by a host read."""
        if self.static is not None:
            return self.static
        return not x.is_cpu or capturing_graph()   # a traced graph holds no host read

    @classmethod
    def from_reference(cls, ref_module: BypassBlock, static: bool | None = None) -> "FusedBypassBlock":
        """A fused bypass block sharing ``ref_module``'s gate and (fused twin of its) block."""
        if not isinstance(ref_module, BypassBlock):
            raise TypeError(f"{cls.__name__}.from_reference: `ref_module` must be a BypassBlock, "
                            f"got {type(ref_module).__name__}")
        m = cls(ref_module.block, ref_module.dim, ref_module.rho, enforce=True, static=static)
        m.enforce, m.gate = ref_module.enforce, ref_module.gate   # share the reference's gate (or none)
        return m.train(ref_module.training)

    def forward(self, x):
        self._check(x)
        B = x.shape[0]
        if self.enforce:
            self.samples_run += B
            return self.block(x), torch.zeros(B, dtype=torch.bool, device=x.device)
        p = self.gate_probability(x)
        if self.training or self.runs_static(x):
            self.samples_run += B
            return self._select(x, self.block(x), p)
        skip = p > self.rho
        run = (~skip).nonzero().squeeze(1)
        n = int(run.numel())
        self.samples_run += n
        if n == B:
            return self.block(x), skip
        if n == 0:
            return x, skip
        y = self.block(x.index_select(0, run))
        return x.index_copy(0, run, y.to(x.dtype)), skip


class ABTrackBackbone(nn.Module):
    """ABTrack's backbone (reference; module doc). ``forward(z, x)`` → ``(tokens [B, Lz + Lx, C],
    {"attn": None, "skipped": [B, depth] bool})``."""

    bypass_cls = BypassBlock
    block_cls = Block
    patch_embed_cls = PatchEmbed

    def __init__(self, depth: int = 12, n_enf: int = 4, rho: float = 0.5, embed_dim: int = 768, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, patch_size: int = 16, template_size: int = 128,
                 search_size: int = 256, pretrain_size: int = 224, drop_path_rate: float = 0.0):
        super().__init__()
        who = type(self).__name__
        if not 0 <= n_enf <= depth:
            raise _err(who, f"`n_enf` must be in [0, depth={depth}], got {n_enf!r}")
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size % patch_size:
                raise _err(who, f"`{name}` ({size}) must be a multiple of patch_size={patch_size}")
        self.config = dict(depth=depth, n_enf=n_enf, rho=rho, embed_dim=embed_dim, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_size=patch_size,
                           template_size=template_size, search_size=search_size, pretrain_size=pretrain_size,
                           drop_path_rate=drop_path_rate)
        C = embed_dim
        self.feat_sz_z, self.feat_sz_x = template_size // patch_size, search_size // patch_size
        self.lens_z, self.lens_x = self.feat_sz_z ** 2, self.feat_sz_x ** 2
        self.patch_embed = self.patch_embed_cls(pretrain_size, patch_size, 3, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (pretrain_size // patch_size) ** 2, C))
        self.pos_embed_z = nn.Parameter(torch.zeros(1, self.lens_z, C))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, self.lens_x, C))
        self.bypass_token = nn.Parameter(torch.zeros(1, 1, C))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block = partial(self.block_cls, dim=C, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.blocks = nn.ModuleList([self.bypass_cls(block(drop_path=dpr[i]), C, rho, enforce=i < n_enf)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        for prm in (self.cls_token, self.pos_embed, self.pos_embed_z, self.pos_embed_x, self.bypass_token):
            trunc_normal_(prm, std=0.02)
        self.apply(init_vit_weights)

    def embed(self, z, x):
        """``[patch_embed(z) + pos_embed_z, patch_embed(x) + pos_embed_x, bypass_token]``."""
        who = type(self).__name__
        p = self.config["patch_size"]
        for name, t, n in (("z", z, self.feat_sz_z), ("x", x, self.feat_sz_x)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3 or t.shape[2:] != (n * p, n * p):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise _err(who, f"`{name}` must be images [B, 3, {n * p}, {n * p}], got {got}")
        if z.shape[0] != x.shape[0]:
            raise _err(who, f"`z` and `x` batch sizes differ ({z.shape[0]} vs {x.shape[0]})")
        B = x.shape[0]
        return torch.cat([patch_tokens(self.patch_embed, z, self.pos_embed_z), patch_tokens(self.patch_embed, x, self.pos_embed_x),
                          self.bypass_token.expand(B, -1, -1)], dim=1)

    def forward(self, z, x):
        t = self.embed(z, x)
        skipped = []
        for blk in self.blocks:
            t, s = blk(t)
            skipped.append(s)
        return self.norm(t[:, :-1]), {"attn": None, "skipped": torch.stack(skipped, dim=1)}

    def reset_counters(self) -> None:
        for blk in self.blocks:
            blk.reset_counters()

    _prune_inner = staticmethod(masked_block)

    def apply_pruning(self, kept: list) -> "ABTrackBackbone":
        """Prune the embedding dims of every inner block, in place: ``kept[i] = (attn_index,
        mlp_index)`` (D1, D2 kept dims, e.g. from `fasttrack.prune.select_kept`), or None to leave
        block i dense. The reference becomes masked dense (`MaskedBlock`), the fused pruned
        (`PrunedBlock`). Returns self."""
        if len(kept) != len(self.blocks):
            raise _err(type(self).__name__, f"`kept` must have one entry per block ({len(self.blocks)}), "
                                            f"got {len(kept)}")
        for blk, k in zip(self.blocks, kept):
            if k is not None:
                blk.block = self._prune_inner(blk.block, *k)
        return self


class FusedABTrackBackbone(ABTrackBackbone):
    """`ABTrackBackbone` with `FusedBypassBlock` around fused inner blocks. Same keys and forward."""

    bypass_cls = FusedBypassBlock
    block_cls = FusedBlock
    patch_embed_cls = FusedPatchEmbed
    _prune_inner = staticmethod(prune_block)

    @classmethod
    def from_reference(cls, ref_module: ABTrackBackbone, static: bool | None = None) -> "FusedABTrackBackbone":
        """A fused backbone sharing ``ref_module``'s Parameters; pruned inner blocks (see
        `fasttrack.nn.pruned`) get their fused twins."""
        if not isinstance(ref_module, ABTrackBackbone):
            raise TypeError(f"{cls.__name__}.from_reference: `ref_module` must be an ABTrackBackbone, "
                            f"got {type(ref_module).__name__}")
        if not isinstance(ref_module.blocks, nn.ModuleList):
            raise TypeError(f"{cls.__name__}.from_reference: `ref_module.blocks` must be an nn.ModuleList")
        blocks = nn.ModuleList([FusedBypassBlock.from_reference(b, static) for b in ref_module.blocks])
        return twin_from_reference(cls, ref_module, ABTrackBackbone, blocks=blocks)


def build_abtrack(keep_ratio: float = 0.7, fused: bool = False, seed: int = 0, per_head: bool = False,
                  **backbone_kw) -> ABTrackBackbone:
    """An ABTrack backbone with every block's dims pruned to ``kept_count(C, keep_ratio, heads)``.
    The D1/D2 scores that ABTrack learns are drawn at random (``seed``) — a stand-in for trained
    scores, for tests, benchmarks and the demo. ``fused`` returns the fused twin of the reference."""
    ref = ABTrackBackbone(**backbone_kw)
    g = torch.Generator().manual_seed(seed)
    C, heads = ref.config["embed_dim"], ref.config["num_heads"]
    kept = [tuple(select_kept(torch.rand(C, generator=g), keep_ratio, heads, per_head) for _ in range(2))
            for _ in ref.blocks]
    ref.apply_pruning(kept)
    return FusedABTrackBackbone.from_reference(ref) if fused else ref


# patch_model (no official ABTrack code exists: these recognise this module's reference classes).
# The fused inner blocks store pruned weights where the reference masks dense ones: the state-dict
# layout changes by design (converts_state).
def _probe_backbone(m):
    c = m.config
    return (probe_like(m, 1, 3, c["template_size"], c["template_size"]),
            probe_like(m, 1, 3, c["search_size"], c["search_size"])), {}


register_recognizer(
    "abtrack.backbone",
    lambda m: isinstance(getattr(m, "bypass_token", None), nn.Parameter) and hasattr(m, "blocks") and hasattr(m, "config"),
    FusedABTrackBackbone.from_reference, probe=_probe_backbone, converts_state=True)
register_recognizer(
    "abtrack.bypass_block",
    lambda m: all(hasattr(m, n) for n in ("block", "gate", "rho", "enforce", "dim")),
    FusedBypassBlock.from_reference, probe=lambda m: ((probe_like(m, 2, 9, m.dim),), {}), converts_state=True)
