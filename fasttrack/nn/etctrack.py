"""ETCTrack: temporal template compression (Adaptive Token Compressor) and the hierarchical
interaction block that fuses the compressed templates with the search region.

ETCTrack's code is not public; this module states the design from the paper and fixes the details
the paper leaves open (marked *choice*). Reference modules use the plain ViT pieces of
`fasttrack.nn.vit` (explicit-softmax attention, ``nn.Linear``); fused twins have the same
constructor and keys and run FastLinear GEMMs and SDPA. Both call the public `merge_tokens` op.

`TokenCompressor` (ATC) — ``z [B, T, L, C]`` (T template frames of L tokens) →
``Merged(merged [B, K, C], target_index, source_index, assignment)``, ``K = max(1, floor(r·T·L))``:
1. ``z + temporal_pos_embed`` (one learnable ``[1, C]`` vector per frame, broadcast over its L tokens);
2. the token-correlation module: ``depth`` pre-norm ViT self-attention blocks over all T·L tokens;
3. scores from a fixed random projection, ``score = z · score_proj`` (``score_proj [C]``: a seeded
   Gaussian vector of unit norm, not trained);
4. `merge_tokens` with keep ratio r: the top-K tokens by score are kept, every other token is added
   into its most cosine-similar kept token (``reduce="sum"``, the paper's rule). *choice*: the
   merged tokens, the metric and the scores are all the correlation module's output.

Keys::

    temporal_pos_embed [T, 1, C]
    blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}   i < depth
    score_proj [C]                      a persistent buffer, so a checkpoint reproduces its merges

`HIBlock` — ``(z [B, K, C], x [B, Hs·Ws, C])`` → ``(z, x)``:
1. template ← search cross-attention: ``z = z + CA(norm_q(z), norm_kv(x))``;
2. ``depth`` ViT blocks on ``[z, x]``;
3. search ← template cross-attention: ``x = x + CA(norm_q(x), norm_kv(z))``;
4. ConvFFN on the search map: ``x = x + fc2(GELU(dwconv3x3(fc1(norm(x)))))`` (*choice*: PVTv2's
   ConvFFN, hidden width ``ffn_ratio·C``, depthwise 3×3 conv with bias on the ``Hs × Ws`` map).

Keys (CA = ``{norm_q, norm_kv}.{weight, bias}``, ``attn.{q, kv, proj}.{weight, bias}``; ``kv`` is
one ``[2C, C]`` linear, keys first)::

    template_cross.<CA>
    blocks.{i}.<ViT block>              i < depth
    search_cross.<CA>
    conv_ffn.{norm, fc1, dwconv, fc2}.{weight, bias}

`ETCTrackEncoder` chains the compressor and ``num_stages`` HIBlocks (keys ``compressor.*``,
``stages.{k}.*``). LayerNorms use eps=1e-6 (*choice*, as the OSTrack-lineage ViTs).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.twin import twin_from_reference
from fasttrack.nn.linear import FastLinear
from fasttrack.nn.cuda_graph import GraphedStep, require_cuda
from fasttrack.nn.derived import TransientState
from fasttrack.nn.vit import Block, FusedBlock, identity_like, init_vit_weights, linear_add
from fasttrack.ops import Merged, merge_tokens
from fasttrack.nn._recognizers import probe_like, register_recognizer

__all__ = ["CrossAttention", "FusedCrossAttention", "CrossAttentionBlock", "FusedCrossAttentionBlock", "ConvFFN",
           "FusedConvFFN", "TokenCompressor", "FusedTokenCompressor", "HIBlock", "FusedHIBlock", "ETCTrackEncoder",
           "FusedETCTrackEncoder"]

_norm = partial(nn.LayerNorm, eps=1e-6)


def _err(who: str, msg: str) -> ValueError:
    return ValueError(f"fasttrack.nn.etctrack.{who}: {msg}")


def _check_tokens(t, who: str, name: str, dim: int, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != dim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise _err(who, f"`{name}` must be tokens [B, N, {dim}], got {got}")
    if length is not None and t.shape[1] != length:
        raise _err(who, f"`{name}` must have {length} tokens, got {t.shape[1]}")


# --------------------------------------------------------------------------------------------
# Cross-attention
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention of queries ``xq [B, Nq, C]`` over ``xkv [B, Nk, C]`` (explicit softmax)."""

    linear_cls = nn.Linear

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise _err(type(self).__name__, f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = self.linear_cls(dim, dim, bias=qkv_bias)
        self.kv = self.linear_cls(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = self.linear_cls(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, xq, xkv):
        B, Nq, C = xq.shape
        H = self.num_heads
        q = self.q(xq).reshape(B, Nq, H, C // H).transpose(1, 2)
        k, v = self.kv(xkv).reshape(B, xkv.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, xq, xkv):
        q, k, v = self._heads(xq, xkv)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        B, H, Nq, D = q.shape
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, Nq, H * D)))


class FusedCrossAttention(CrossAttention):
    """`CrossAttention` on SDPA with FastLinear layers; `forward_add` fuses the residual into proj."""

    linear_cls = FastLinear

    def _core(self, xq, xkv):
        q, k, v = self._heads(xq, xkv)
        p = self.attn_drop.p if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        B, H, Nq, D = o.shape
        return o.transpose(1, 2).reshape(B, Nq, H * D)

    def forward(self, xq, xkv):
        return self.proj_drop(self.proj(self._core(xq, xkv)))

    def forward_add(self, xq, xkv, residual):
        o = self._core(xq, xkv)
        if identity_like(self.proj_drop):
            return linear_add(self.proj, o, residual)
        return residual + self.proj_drop(self.proj(o))


class CrossAttentionBlock(nn.Module):
    """``xq + CA(norm_q(xq), norm_kv(xkv))``."""

    attn_cls = CrossAttention

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.norm_q = _norm(dim)
        self.norm_kv = _norm(dim)
        self.attn = self.attn_cls(dim, num_heads, qkv_bias, attn_drop, proj_drop)

    def forward(self, xq, xkv):
        return xq + self.attn(self.norm_q(xq), self.norm_kv(xkv))


class FusedCrossAttentionBlock(CrossAttentionBlock):
    attn_cls = FusedCrossAttention

    def forward(self, xq, xkv):
        return self.attn.forward_add(self.norm_q(xq), self.norm_kv(xkv), xq.contiguous())


# --------------------------------------------------------------------------------------------
# ConvFFN
# --------------------------------------------------------------------------------------------
class ConvFFN(nn.Module):
    """``x + fc2(drop(GELU(dwconv3x3(fc1(norm(x))))))`` over the ``hw`` map of ``x [B, H·W, C]``."""

    linear_cls = nn.Linear

    def __init__(self, dim: int, hw: tuple[int, int], ffn_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * ffn_ratio)
        self.hw = tuple(hw)
        self.norm = _norm(dim)
        self.fc1 = self.linear_cls(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = self.linear_cls(hidden, dim)
        self.drop = nn.Dropout(drop)

    def _hidden(self, x):
        B, N, _ = x.shape
        h = self.fc1(self.norm(x))
        # [B, N, Ch] viewed as a channels-last [B, Ch, H, W] map: no copy in or out of the conv
        m = h.transpose(1, 2).reshape(B, h.shape[-1], *self.hw)
        h = self.act(self.dwconv(m)).flatten(2).transpose(1, 2)
        return h if identity_like(self.drop) else self.drop(h)

    def forward(self, x):
        _check_tokens(x, type(self).__name__, "x", self.norm.normalized_shape[0], self.hw[0] * self.hw[1])
        return x + self.drop(self.fc2(self._hidden(x)))


class FusedConvFFN(ConvFFN):
    linear_cls = FastLinear

    def forward(self, x):
        _check_tokens(x, type(self).__name__, "x", self.norm.normalized_shape[0], self.hw[0] * self.hw[1])
        h = self._hidden(x).contiguous()
        if identity_like(self.drop):
            return linear_add(self.fc2, h, x.contiguous())
        return x + self.drop(self.fc2(h))


# --------------------------------------------------------------------------------------------
# Adaptive Token Compressor
# --------------------------------------------------------------------------------------------
class TokenCompressor(nn.Module):
    """ETCTrack's ATC (module doc): ``forward(z [B, T, L, C] or [B, T·L, C])`` → `Merged`."""

    block_cls = Block

    def __init__(self, dim: int = 768, num_frames: int = 5, tokens_per_frame: int = 64, keep_ratio: float = 0.7,
                 depth: int = 1, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, seed: int = 0, reduce: str = "sum"):
        super().__init__()
        who = type(self).__name__
        if not 0.0 < float(keep_ratio) <= 1.0:
            raise _err(who, f"`keep_ratio` must be in (0, 1], got {keep_ratio!r}")
        if num_frames < 1 or tokens_per_frame < 1 or depth < 0:
            raise _err(who, f"need num_frames >= 1, tokens_per_frame >= 1, depth >= 0; got {num_frames}, "
                            f"{tokens_per_frame}, {depth}")
        if reduce not in ("sum", "mean"):
            raise _err(who, f"`reduce` must be 'sum' or 'mean', got {reduce!r}")
        self.config = dict(dim=dim, num_frames=num_frames, tokens_per_frame=tokens_per_frame, keep_ratio=keep_ratio,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           drop_path=drop_path, seed=seed, reduce=reduce)
        self.dim, self.num_frames, self.tokens_per_frame = dim, num_frames, tokens_per_frame
        self.keep_ratio, self.reduce = float(keep_ratio), reduce
        self.temporal_pos_embed = nn.Parameter(torch.zeros(num_frames, 1, dim))
        self.blocks = nn.Sequential(*[self.block_cls(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                                     drop_path=drop_path, norm_layer=_norm) for _ in range(depth)])
        g = torch.Generator(device="cpu").manual_seed(seed)
        proj = torch.randn(dim, generator=g, device="cpu")
        self.register_buffer("score_proj", proj / proj.norm())
        trunc_normal_(self.temporal_pos_embed, std=0.02)
        self.apply(init_vit_weights)

    def correlate(self, z: torch.Tensor) -> torch.Tensor:
        """Steps 1–2: ``[B, T·L, C]`` tokens after the temporal encoding and the correlation blocks."""
        who = type(self).__name__
        T, L, C = self.num_frames, self.tokens_per_frame, self.dim
        if isinstance(z, torch.Tensor) and z.dim() == 3 and z.shape[1:] == (T * L, C):
            z = z.view(z.shape[0], T, L, C)
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != (T, L, C):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise _err(who, f"`z` must be [B, {T}, {L}, {C}] or [B, {T * L}, {C}] template tokens, got {got}")
        z = (z + self.temporal_pos_embed).reshape(z.shape[0], T * L, C)
        return self.blocks(z)

    def forward(self, z: torch.Tensor) -> Merged:
        z = self.correlate(z)
        return merge_tokens(z, self.keep_ratio, proj=self.score_proj.to(z.dtype), reduce=self.reduce)


class FusedTokenCompressor(TokenCompressor):
    """`TokenCompressor` with `FusedBlock` correlation blocks. Same constructor, keys, forward."""

    block_cls = FusedBlock

    @classmethod
    def from_reference(cls, ref_module: TokenCompressor) -> "FusedTokenCompressor":
        """A fused compressor sharing ``ref_module``'s Parameters and buffer (no copy)."""
        return twin_from_reference(cls, ref_module, TokenCompressor)


# --------------------------------------------------------------------------------------------
# Hierarchical interaction block
# --------------------------------------------------------------------------------------------
class HIBlock(nn.Module):
    """ETCTrack's hierarchical interaction block (module doc): ``forward(z, x)`` → ``(z, x)``."""

    block_cls = Block
    cross_cls = CrossAttentionBlock
    ffn_cls = ConvFFN

    def __init__(self, dim: int = 768, num_heads: int = 12, depth: int = 2, search_hw: tuple[int, int] = (16, 16),
                 mlp_ratio: float = 4.0, ffn_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        if depth < 0 or len(search_hw) != 2:
            raise _err(type(self).__name__, f"need depth >= 0 and search_hw=(H, W); got {depth}, {search_hw!r}")
        self.config = dict(dim=dim, num_heads=num_heads, depth=depth, search_hw=tuple(search_hw),
                           mlp_ratio=mlp_ratio, ffn_ratio=ffn_ratio, qkv_bias=qkv_bias, drop_path=drop_path)
        self.dim, self.search_hw = dim, tuple(search_hw)
        self.template_cross = self.cross_cls(dim, num_heads, qkv_bias)
        self.blocks = nn.Sequential(*[self.block_cls(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                                     drop_path=drop_path, norm_layer=_norm) for _ in range(depth)])
        self.search_cross = self.cross_cls(dim, num_heads, qkv_bias)
        self.conv_ffn = self.ffn_cls(dim, self.search_hw, ffn_ratio)
        self.apply(init_vit_weights)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        who = type(self).__name__
        _check_tokens(z, who, "z", self.dim)
        _check_tokens(x, who, "x", self.dim, self.search_hw[0] * self.search_hw[1])
        if z.shape[0] != x.shape[0]:
            raise _err(who, f"`z` and `x` batch sizes differ ({z.shape[0]} vs {x.shape[0]})")
        K = z.shape[1]
        z = self.template_cross(z, x)
        t = self.blocks(torch.cat([z, x], dim=1))
        z, x = t[:, :K], t[:, K:]
        x = self.search_cross(x, z)
        return z, self.conv_ffn(x)


class FusedHIBlock(HIBlock):
    """`HIBlock` with FastLinear / SDPA pieces and residual adds fused into the output GEMMs."""

    block_cls = FusedBlock
    cross_cls = FusedCrossAttentionBlock
    ffn_cls = FusedConvFFN

    @classmethod
    def from_reference(cls, ref_module: HIBlock) -> "FusedHIBlock":
        """A fused block sharing ``ref_module``'s Parameters (no copy)."""
        return twin_from_reference(cls, ref_module, HIBlock)


# --------------------------------------------------------------------------------------------
# Encoder: compressor + interaction stages
# --------------------------------------------------------------------------------------------
class ETCTrackEncoder(TransientState, nn.Module):
    """The compressor followed by ``num_stages`` `HIBlock` s (*choice*: 4 stages of 3 ViT blocks,
    ViT-B's 12): ``forward(z [B, T, L, C], x [B, Hs·Ws, C])`` → ``(z [B, K, C], x [B, Hs·Ws, C])``.
    Keys: ``compressor.*`` (TokenCompressor) and ``stages.{k}.*`` (HIBlock)."""

    compressor_cls = TokenCompressor
    stage_cls = HIBlock
    _transient = ("_track_z", "_track_graph")

    def __init__(self, dim: int = 768, num_heads: int = 12, num_frames: int = 5, tokens_per_frame: int = 64,
                 keep_ratio: float = 0.7, compressor_depth: int = 1, num_stages: int = 4, stage_depth: int = 3,
                 search_hw: tuple[int, int] = (16, 16), seed: int = 0):
        super().__init__()
        self.config = dict(dim=dim, num_heads=num_heads, num_frames=num_frames, tokens_per_frame=tokens_per_frame,
                           keep_ratio=keep_ratio, compressor_depth=compressor_depth, num_stages=num_stages,
                           stage_depth=stage_depth, search_hw=tuple(search_hw), seed=seed)
        self.compressor = self.compressor_cls(dim, num_frames, tokens_per_frame, keep_ratio, depth=compressor_depth,
                                              num_heads=num_heads, seed=seed)
        self.stages = nn.ModuleList([self.stage_cls(dim, num_heads, depth=stage_depth, search_hw=search_hw)
                                     for _ in range(num_stages)])

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stages(self.compressor(z).merged, x)

    def _stages(self, z, x):
        for stage in self.stages:
            z, x = stage(z, x)
        return z, x

    def track(self, x: torch.Tensor, z: torch.Tensor | None = None, cuda_graph: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Opt-in per-frame API: reuse the compressed template history while it is unchanged.

        Exactness: the compressor reads only the template history ``z`` (temporal position
        encoding, token correlation, fixed projection scores, merge), never the search tokens, so
        its output can be reused exactly for as long as ``z`` is the same; everything from the
        first `HIBlock` on mixes template and search and is recomputed. Give ``z`` on the first
        frame and whenever the history changes (a new frame enters it); ``None`` reuses the cached
        compression, computed with the weights of that call. The result equals ``forward(last z,
        x)`` exactly.

        ``cuda_graph=True`` (CUDA tensors only): the stages run as one CUDA-graph replay per input
        shape (`fasttrack.nn.cuda_graph`; outputs are the capture's buffers, overwritten by the next
        call), with the same values as the eager step."""
        if cuda_graph:
            require_cuda("ETCTrackEncoder.track", x=x, z=z)
        if z is not None:
            self._track_z = self.compressor(z).merged
        merged = self.__dict__.get("_track_z")
        if merged is None:
            raise _err("ETCTrackEncoder.track", "pass `z` (the template history) on the first call")
        if merged.shape[0] != x.shape[0]:
            raise _err("ETCTrackEncoder.track", f"`x` has batch {x.shape[0]}, the cached history {merged.shape[0]}")
        if cuda_graph:
            step = self.__dict__.get("_track_graph")
            if step is None:
                step = self.__dict__["_track_graph"] = GraphedStep(self._stages, name="ETCTrackEncoder.track")
            return step(merged, x)
        return self._stages(merged, x)


class FusedETCTrackEncoder(ETCTrackEncoder):
    """`ETCTrackEncoder` of fused parts. Same constructor, keys and forward."""

    compressor_cls = FusedTokenCompressor
    stage_cls = FusedHIBlock

    @classmethod
    def from_reference(cls, ref_module: ETCTrackEncoder) -> "FusedETCTrackEncoder":
        """A fused encoder sharing ``ref_module``'s Parameters and buffer (no copy)."""
        return twin_from_reference(cls, ref_module, ETCTrackEncoder)


# patch_model (no official ETCTrack code exists: these recognise this module's reference classes,
# by structure)
def _history(m):
    c = m.config
    return probe_like(m, 1, c["num_frames"], c["tokens_per_frame"], c["dim"])


def _search(m, hw):
    return probe_like(m, 1, hw[0] * hw[1], m.config["dim"])


register_recognizer(
    "etctrack.encoder",
    lambda m: all(hasattr(m, n) for n in ("compressor", "stages", "config")),
    FusedETCTrackEncoder.from_reference, probe=lambda m: ((_history(m), _search(m, m.config["search_hw"])), {}))
register_recognizer(
    "etctrack.token_compressor",
    lambda m: all(hasattr(m, n) for n in ("temporal_pos_embed", "score_proj", "blocks", "config")),
    FusedTokenCompressor.from_reference, probe=lambda m: ((_history(m),), {}))
register_recognizer(
    "etctrack.hi_block",
    lambda m: all(hasattr(m, n) for n in ("template_cross", "search_cross", "conv_ffn", "blocks", "config")),
    FusedHIBlock.from_reference,
    probe=lambda m: ((probe_like(m, 1, 20, m.config["dim"]), _search(m, m.config["search_hw"])), {}))
