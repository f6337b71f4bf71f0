"""Plain ViT pieces shared by every family: reference modules and their fused twins.

Reference modules (`Mlp`, `Attention`, `Block`, `DropPath`) restate the tracker repositories'
timm-derived code (OSTrack ``lib/models/layers/attn.py::Attention``, timm ``Mlp`` / ``DropPath``):
explicit ``softmax(q·kᵀ·scale)`` attention, parameter names ``qkv``, ``proj``, ``fc1``, ``fc2``,
``norm1``, ``norm2``. They are what parity is measured against.

Fused twins (`FusedAttention`, `FusedMlp`, `FusedBlock`) take the same constructor and produce the
same state-dict keys, and are built for CPU inference speed:
- linears are `FastLinear` (pre-packed weights: fasttrack's panel GEMM or oneDNN's primitive,
  `fasttrack.nn.linear`); where the packed path runs, the GELU of the MLP and the residual adds
  after ``proj`` / ``fc2`` are the GEMM's epilogue (oneDNN: post-ops), so the ``[B, N, 4C]`` hidden
  activation and the residual sum are written once;
- the attention core, unless the caller asks for the map (``return_attention=True``: then the
  official explicit math runs, so the map is exactly the reference's), is fasttrack's CPU kernel
  (`fasttrack.ops.attention_core`, read in place from the qkv output) where it serves the input
  (`attention_kernel_serves` states the rule), else `scaled_dot_product_attention`, never
  materialising ``[B, H, N, N]``, except bf16 / fp16 on CPU, where the explicit core is faster
  (`sdpa_is_faster`).
- the norms of a `FusedBlock` run fasttrack's LayerNorm kernel (`norm_forward`), and on the CPU
  inference path a whole block (or each half, where a CE block reads q / k in between) is one C++
  call of the same ops (`native_block_serves` states when; the output is bit-identical). fasttrack's
  backbones decide that for every block once per forward, before the first block runs
  (`native_plan`, `call_block`).
``from_reference(module)`` builds a fused module that shares the given module's Parameters (no
copy). It reads the module by structure (attribute names), so it also accepts the official
trackers' own classes; `fasttrack.patch_model` relies on that.

Masks follow OSTrack: ``mask [B, N]`` bool, True = the key is masked out.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack.nn._recognizers import forward_params, is_linear, has_attrs, probe_like, register_recognizer
from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.derived import Derived
from fasttrack import _extension
from fasttrack.backend import capturing_graph
from fasttrack.nn.linear import FastLinear, packable, packed_linear, packed_linear_add, packed_linear_gelu
from fasttrack.ops._registry import calls_cpu_kernel
from fasttrack.ops.attention import attention_core, fast_path_serves
from fasttrack.ops.layer_norm import fast_path_serves as layer_norm_fast_path, layer_norm as layer_norm_op

__all__ = ["PatchEmbed", "FusedPatchEmbed", "patch_tokens",
           "init_vit_weights", "DropPath", "Mlp", "Attention", "Block", "FusedMlp", "FusedAttention",
           "FusedBlock", "linear_gelu", "linear_add", "sdpa_is_faster", "attention_kernel_serves",
           "native_block_serves", "native_plan", "NativePlanEntry", "call_block", "fused_final_norm"]


# --------------------------------------------------------------------------------------------
# Embedding and init (OSTrack-lineage ViTs)
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """OSTrack ``PatchEmbed``: a stride-``patch_size`` conv (``proj``), flattened to tokens."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class FusedPatchEmbed(PatchEmbed):
    """`PatchEmbed` (same keys: ``proj``, ``norm``) whose patchify conv runs, where it serves the input
    (`gemm_serves`), as one pre-packed oneDNN GEMM: a stride-p p×p conv over non-overlapping patches
    is a GEMM with K = C_in·p² once each patch's pixels sit in a row (one copy of the image), and the
    tokens come out ``[B, L, C]`` with no transpose; ``forward(x, pos)`` adds the position embedding
    as the GEMM's post-op. Conv + flatten + add vs this, OSTrack-256 on one Zen 4 core: bf16 search
    2.68 -> 1.53 ms, template 1.01 -> 0.41; fp32 3.40 -> 2.90, 1.10 -> 0.77."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self._gemm_weight = Derived()   # proj.weight as [C, C_in·p²], pre-packed

    @classmethod
    def from_reference(cls, ref: nn.Module) -> "FusedPatchEmbed":
        """Share ``ref``'s ``proj`` (an ``nn.Conv2d``) and ``norm``; ``ref`` must flatten to tokens."""
        if not isinstance(getattr(ref, "proj", None), nn.Conv2d) or not getattr(ref, "flatten", True):
            raise TypeError(f"{cls.__name__}.from_reference: `ref` must have a Conv2d `proj` and flatten to tokens, "
                            f"got {type(ref).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("img_size", "patch_size", "grid_size", "num_patches"):
            if hasattr(ref, k):
                setattr(m, k, getattr(ref, k))
        m.proj, m.norm = ref.proj, getattr(ref, "norm", nn.Identity())
        m._gemm_weight = Derived()
        m.train(ref.training)
        return m

    def gemm_serves(self, x: torch.Tensor) -> bool:
        """The dispatch rule: the GEMM runs for a 4-D input whose sides the stride divides, a conv
        with kernel = stride and no padding / dilation / groups, an identity ``norm``, and the packed
        CPU inference path of `FastLinear` (`fasttrack.nn.linear.packable`)."""
        c = self.proj
        return (x.dim() == 4 and isinstance(self.norm, nn.Identity) and c.kernel_size == c.stride
                and c.padding == (0, 0) and c.dilation == (1, 1) and c.groups == 1 and x.shape[1] == c.in_channels
                and x.shape[2] % c.stride[0] == 0 and x.shape[3] % c.stride[1] == 0 and packable(x, c.weight, c.bias))

    def _packed(self) -> torch.Tensor:
        w = self.proj.weight
        return self._gemm_weight.get((w,), lambda: torch.ops.mkldnn._reorder_linear_weight(
            w.detach().reshape(w.shape[0], -1).contiguous()))

    def forward(self, x, pos=None):
        """Tokens ``[B, L, C]``; with ``pos`` (``[1 or B, L, C]``), ``tokens + pos``."""
        if not self.gemm_serves(x):
            t = super().forward(x)
            return t if pos is None else t + pos
        B, C_in, H, W = x.shape
        ph, pw = self.proj.stride
        cols = x.reshape(B, C_in, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(
            B, (H // ph) * (W // pw), C_in * ph * pw)
        if pos is not None and pos.dtype == x.dtype and pos.shape == (B, cols.shape[1], self.proj.out_channels) \
                and pos.is_contiguous() and not (torch.is_grad_enabled() and pos.requires_grad):
            return torch.ops.mkldnn._linear_pointwise.binary(cols, pos, self._packed(), self.proj.bias, "add")
        t = packed_linear(cols, self._packed(), self.proj.bias)
        return t if pos is None else t + pos


def patch_tokens(patch_embed: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``patch_embed(x) + pos`` (the add fused into the GEMM where ``patch_embed`` is a
    `FusedPatchEmbed`)."""
    if isinstance(patch_embed, FusedPatchEmbed):
        return patch_embed(x, pos)
    return patch_embed(x) + pos


def init_vit_weights(m):
    """timm / OSTrack ViT init (``module.apply``): truncated-normal(0.02) linears with zero bias, unit
    LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# GEMM + epilogue helpers (the packed GEMM's epilogue on the packed path, plain PyTorch otherwise)
# --------------------------------------------------------------------------------------------
def is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


def linear_gelu(fc: nn.Linear, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(fc(x))``; one packed GEMM with the GELU as its epilogue when ``fc`` takes the packed path."""
    if isinstance(fc, FastLinear) and is_exact_gelu(act) and fc.uses_packed(x):
        return packed_linear_gelu(x, fc._packed.get(fc.weight), fc.bias)
    return act(fc(x))


def linear_add(fc: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + fc(x)``; one packed GEMM with the add as its epilogue when ``fc`` takes the packed path
    (the caller guarantees nothing — dropout, drop-path, layer scale — sits between them). The
    post-op is not differentiable, so a residual that needs a gradient takes the plain path."""
    if (isinstance(fc, FastLinear) and fc.uses_packed(x) and residual.dtype == x.dtype
            and not (torch.is_grad_enabled() and residual.requires_grad)
            and residual.shape[:-1] == x.shape[:-1] and residual.is_contiguous() and x.is_contiguous()):
        return packed_linear_add(x, residual, fc._packed.get(fc.weight), fc.bias)
    return residual + fc(x)


def norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; fasttrack's `_layer_norm` CPU kernel when ``norm`` is exactly `nn.LayerNorm` over
    the last dim and the kernel's vectorised path serves x (CPU, float32 with AVX-512 / bfloat16
    with AVX512_BF16, no gradient needed, not traced). Interleaved medians, one Zen 4 core, torch's
    LayerNorm vs this: 320 x 768 tokens bf16 112.9 vs 58.8 µs, fp32 79.5 vs 48.0; 153 x 768 bf16
    56.6 vs 31.5, fp32 42.7 vs 26.7."""
    if (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and x.is_cpu
            and layer_norm_fast_path(x.dtype) and x.dim() >= 1 and x.shape[-1] == norm.normalized_shape[0]
            and not capturing_graph() and not (torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in (norm.weight, norm.bias))))):
        return layer_norm_op(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def fused_final_norm(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fused backbone's final ``backbone.norm(x)``: through `norm_forward` (fasttrack's LayerNorm
    kernel where it serves) when calling the module would just run its forward, else the module
    call (its hooks run). The reference classes call the module: torch's LayerNorm. Measured right
    after the last block (CompressTracker-4, 320 x 768 bf16 tokens, one Zen 4 core, interleaved):
    242 µs torch's, 210 µs this; most of either is the cold call, not the arithmetic."""
    norm = backbone.norm
    return norm_forward(norm, x) if _calls_forward_directly(norm) else norm(x)


def identity_like(m: nn.Module | None) -> bool:
    """True for modules that are the identity in the current mode (Identity, Dropout(p=0) or eval)."""
    if m is None or isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return m.p == 0 or not m.training
    if isinstance(m, DropPath):
        return m.drop_prob == 0 or not m.training
    return False


# --------------------------------------------------------------------------------------------
# Reference modules
# --------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``): in training, zero a sample's residual
    branch with probability ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_path_or_identity(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 → act → drop → fc2 → drop."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """OSTrack's ``Attention``: explicit softmax attention; ``mask [B, N]`` bool masks keys."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: `dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, mask=None, return_attention=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = attn.masked_fill(mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
        return (x, attn) if return_attention else x


def _init_block_parts(m, attn_cls, mlp_cls, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                      act_layer, norm_layer):
    """The pre-norm block's submodules (keys norm1, attn, norm2, mlp), shared by `Block` and `FusedBlock`."""
    m.norm1 = norm_layer(dim)
    m.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
    m.drop_path = drop_path_or_identity(drop_path)
    m.norm2 = norm_layer(dim)
    m.mlp = mlp_cls(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)


class Block(nn.Module):
    """Pre-norm ViT block (OSTrack ``vit.py::Block``): x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        _init_block_parts(self, Attention, Mlp, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                          act_layer, norm_layer)

    def forward(self, x, mask=None, return_attention=False):
        if return_attention:
            y, attn = self.attn(self.norm1(x), mask, True)
        else:
            y, attn = self.attn(self.norm1(x), mask), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


# --------------------------------------------------------------------------------------------
# Fused twins
# --------------------------------------------------------------------------------------------
def _require(module: nn.Module, names: tuple[str, ...], who: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise TypeError(f"{who}.from_reference: `ref_module` ({type(module).__name__}) lacks {missing}")


def _fast(linear: nn.Module, who: str, name: str) -> FastLinear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{who}.from_reference: `{name}` must be an nn.Linear, got {type(linear).__name__}")
    return linear if isinstance(linear, FastLinear) else FastLinear.from_linear(linear)


class FusedMlp(nn.Module):
    """`Mlp` with FastLinear layers and the GELU fused into fc1 on the packed path. Same keys."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = FastLinear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = FastLinear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedMlp":
        """Share ``ref_module``'s fc1 / fc2 / act / dropout (timm's ``drop`` or ``drop1``+``drop2``).
        A normalisation inside the MLP (timm ``norm`` that is not Identity) is refused."""
        who = cls.__name__
        _require(ref_module, ("fc1", "fc2", "act"), who)
        norm = getattr(ref_module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise TypeError(f"{who}.from_reference: `ref_module.norm` is {type(norm).__name__}; "
                            "only Identity is supported")
        drops = [getattr(ref_module, n) for n in ("drop", "drop1", "drop2") if hasattr(ref_module, n)]
        if any(not isinstance(d, (nn.Dropout, nn.Identity)) for d in drops):
            raise TypeError(f"{who}.from_reference: `ref_module` dropout layers must be nn.Dropout / nn.Identity")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.fc1 = _fast(ref_module.fc1, who, "fc1")
        m.act = ref_module.act
        m.fc2 = _fast(ref_module.fc2, who, "fc2")
        p = max((d.p for d in drops if isinstance(d, nn.Dropout)), default=0.0)
        if len({d.p for d in drops if isinstance(d, nn.Dropout)}) > 1:
            raise TypeError(f"{who}.from_reference: `ref_module` has dropouts with different p")
        m.drop = nn.Dropout(p)
        m.train(ref_module.training)
        return m

    def forward(self, x):
        return self.drop(self.fc2(self.drop(linear_gelu(self.fc1, x, self.act))))

    def forward_add(self, x, residual):
        """``residual + self(x)`` with the add fused into fc2 when nothing sits between them."""
        h = linear_gelu(self.fc1, x, self.act)
        if identity_like(self.drop):   # eval: no dropout call (one dispatch fewer per block)
            return linear_add(self.fc2, h, residual)
        return residual + self.drop(self.fc2(self.drop(h)))


def sdpa_is_faster(q: torch.Tensor) -> bool:
    """The attention-core dispatch rule of the fused modules: `scaled_dot_product_attention` except
    for bf16 / fp16 on CPU, where PyTorch's CPU flash kernel is ~2x slower than the explicit
    ``softmax(q·kᵀ)·v`` at tracker sizes. Measured on both CPU generations this project runs on
    (OSTrack-256 block, 320 tokens, 12 heads of 64; `_fast_explicit` for the explicit core):
    Zen 5, one core: bf16 4.7 (SDPA) vs 2.3 ms, fp32 4.7 vs 5.8 ms; Zen 4: bf16 6.5 vs 3.3 ms on one
    thread and 3.1 vs 1.6 ms on two, fp32 4.5 vs 6.4 ms and 2.9 vs 7.6 ms (the explicit fp32 map,
    4.9 MB, is a fresh mmap each call; at 153 tokens the two tie, 0.95 ms). The rule is the same on
    both, so it does not depend on the CPU."""
    return q.device.type != "cpu" or q.dtype in (torch.float32, torch.float64)


def attention_kernel_serves(qkv: torch.Tensor, num_heads: int, mask: torch.Tensor | None = None,
                            dropout_p: float = 0.0) -> bool:
    """The first attention-core dispatch rule of the fused modules (before `sdpa_is_faster`):
    fasttrack's `attention_core` kernel runs when qkv is on CPU, there is no key mask and no active
    attention dropout, no gradient is needed, and the kernel's vectorised path serves the dtype and
    head dim on this CPU (`fasttrack.ops.attention.fast_path_serves`: float32 with AVX-512,
    bfloat16 with AVX512_BF16, head_dim 64). Measured against the core it replaces (`python -m
    bench attention`, interleaved medians, one Zen 4 core, 12 heads of 64): fp32 vs SDPA 3.52 vs
    4.32 ms at 320 tokens, 0.89 vs 1.24 at 153, 17.1 vs 21.8 at 720, 27.6 vs 34.1 at B=8; bf16 vs
    the explicit core 2.05 vs 2.82, 0.51 vs 0.97, 9.7 vs 14.5, 16.6 vs 23.0 ms; 1.22-1.88x in all."""
    if not qkv.is_cpu or mask is not None or dropout_p > 0:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    return fast_path_serves(qkv.dtype, qkv.shape[-1] // (3 * num_heads))


class FusedAttention(nn.Module):
    """`Attention` with FastLinear qkv / proj. Same constructor, keys and forward.

    ``forward(x, mask, return_attention=True)`` runs the explicit math (the map is needed);
    otherwise the core follows `sdpa_is_faster`. `forward_qk` also returns q and k
    (``[B, H, N, D]``) for `topk_select_qk`, and the map when the explicit core ran.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"FusedAttention: `dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = FastLinear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = FastLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedAttention":
        """Share ``ref_module``'s qkv / proj / dropouts. Needs ``num_heads``, ``scale``, ``qkv``,
        ``proj``; relative position bias (OSTrack ``rpe=True``) is refused."""
        who = cls.__name__
        _require(ref_module, ("num_heads", "scale", "qkv", "proj"), who)
        if getattr(ref_module, "rpe", False):
            raise TypeError(f"{who}.from_reference: `ref_module` uses relative position bias (rpe=True)")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.num_heads = int(ref_module.num_heads)
        m.scale = float(ref_module.scale)
        m.qkv = _fast(ref_module.qkv, who, "qkv")
        m.attn_drop = getattr(ref_module, "attn_drop", nn.Dropout(0.0))
        m.proj = _fast(ref_module.proj, who, "proj")
        m.proj_drop = getattr(ref_module, "proj_drop", nn.Dropout(0.0))
        if m.qkv.out_features != 3 * m.qkv.in_features or m.qkv.in_features % m.num_heads:
            raise TypeError(f"{who}.from_reference: `ref_module.qkv` is {m.qkv.in_features}->{m.qkv.out_features}, "
                            f"expected dim->3*dim with dim divisible by num_heads={m.num_heads}")
        m.train(ref_module.training)
        return m

    def _split(self, qkv):
        B, N, C3 = qkv.shape
        return qkv.reshape(B, N, 3, self.num_heads, C3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)

    def _kernel_serves(self, qkv, mask):
        return attention_kernel_serves(qkv, self.num_heads, mask, self.attn_drop.p if self.training else 0.0)

    def _sdpa(self, q, k, v, mask):
        attn_mask = None if mask is None else ~mask[:, None, None, :]
        p = self.attn_drop.p if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=self.scale)
        B, H, N, D = o.shape
        return o.transpose(1, 2).reshape(B, N, H * D)

    def _explicit(self, q, k, v, mask):
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = attn.masked_fill(mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        B, H, N, D = v.shape
        return (attn @ v).transpose(1, 2).reshape(B, N, H * D), attn

    def _fast_explicit(self, q, k, v, mask):
        """`_explicit` for a map nobody returns: q / k / v made contiguous (a strided batched matmul
        copies per head), the scale applied to q (N·D products instead of N²: exact when the scale is
        a power of two, D = 64), softmax in place. bf16, OSTrack-256 B=1, one block, Zen 4:
        1.9 -> 1.64 ms on 2 threads, 4.1 -> 3.3 ms on 1."""
        if self.training and self.attn_drop.p > 0:
            return self._explicit(q, k, v, mask)
        attn = (q.contiguous() * self.scale) @ k.contiguous().transpose(-2, -1)
        if mask is not None:
            attn.masked_fill_(mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        attn = torch.softmax(attn, dim=-1, out=attn) if not attn.requires_grad else attn.softmax(dim=-1)
        B, H, N, D = v.shape
        return (attn @ v.contiguous()).transpose(1, 2).reshape(B, N, H * D), attn

    def _core(self, q, k, v, mask):
        if sdpa_is_faster(q):
            return self._sdpa(q, k, v, mask), None
        return self._fast_explicit(q, k, v, mask)

    def forward(self, x, mask=None, return_attention=False):
        qkv = self.qkv(x)
        if return_attention:
            o, attn = self._explicit(*self._split(qkv), mask)
            return self.proj_drop(self.proj(o)), attn
        if self._kernel_serves(qkv, mask):
            return self.proj_drop(self.proj(attention_core(qkv, self.num_heads, self.scale)))
        return self.proj_drop(self.proj(self._core(*self._split(qkv), mask)[0]))

    def forward_qk(self, x, mask=None, residual=None):
        """``(out, q, k, attn)``, ``attn`` the map if the explicit core ran (`sdpa_is_faster`), else
        None; with ``residual``, ``out = residual + attention(x)`` (the add fused into proj when
        nothing sits between them)."""
        qkv = self.qkv(x)
        q, k, v = self._split(qkv)
        if self._kernel_serves(qkv, mask):
            o, attn = attention_core(qkv, self.num_heads, self.scale), None
        else:
            o, attn = self._core(q, k, v, mask)
        if residual is not None:
            if identity_like(self.proj_drop):
                return linear_add(self.proj, o, residual), q, k, attn
            return residual + self.proj_drop(self.proj(o)), q, k, attn
        return self.proj_drop(self.proj(o)), q, k, attn


# --------------------------------------------------------------------------------------------
# The fused block's native inference path: one C++ call per half-block
# --------------------------------------------------------------------------------------------
_NATIVE = _extension.cpu_functions("vit_block", "vit_attn_residual", "vit_mlp_residual")


def _layer_norm_args(norm: nn.Module, C: int):
    if type(norm) is not nn.LayerNorm or norm.normalized_shape != (C,):
        return None
    return norm.weight, norm.bias, norm.eps


def _packed_args(linear: nn.Module, x: torch.Tensor, in_features: int, out_features: int | None):
    if (type(linear) is not FastLinear or linear.in_features != in_features
            or (out_features is not None and linear.out_features != out_features)):
        return None
    weight, bias = linear.weight, linear.bias
    if not packable(x, weight, bias):
        return None
    return linear._packed.get(weight), bias


def _native_x_served(x: torch.Tensor, mask) -> bool:
    return (_NATIVE is not None and mask is None and x.dim() == 3 and x.is_contiguous()
            and calls_cpu_kernel("_attention", x))


def _native_common(block: nn.Module, x: torch.Tensor, mask) -> bool:
    return identity_like(block._modules.get("drop_path")) and _native_x_served(x, mask)


def _native_attn_args(block: nn.Module, x: torch.Tensor, mask=None) -> tuple | None:
    """`fasttrack._C.cpu.vit_attn_residual`'s arguments after x, or None (`native_block_serves`)."""
    if not _native_common(block, x, mask):
        return None
    attn = block._modules["attn"]
    if (type(attn) is not FusedAttention or (attn.training and attn.attn_drop.p > 0)
            or not identity_like(attn.proj_drop)):
        return None
    C, H = x.shape[2], attn.num_heads
    if C % H or not fast_path_serves(x.dtype, C // H):
        return None
    norm = _layer_norm_args(block._modules["norm1"], C)
    qkv = _packed_args(attn.qkv, x, C, 3 * C)
    proj = _packed_args(attn.proj, x, C, C)
    if norm is None or qkv is None or proj is None:
        return None
    return (*norm, *qkv, *proj, H, attn.scale)


def _native_mlp_args(block: nn.Module, x: torch.Tensor) -> tuple | None:
    """`fasttrack._C.cpu.vit_mlp_residual`'s arguments after x, or None (`native_block_serves`)."""
    if not _native_common(block, x, None):
        return None
    mlp = block._modules["mlp"]
    if type(mlp) is not FusedMlp or not identity_like(mlp.drop) or not is_exact_gelu(mlp.act):
        return None
    C = x.shape[2]
    norm = _layer_norm_args(block._modules["norm2"], C)
    fc1 = _packed_args(mlp.fc1, x, C, None)
    fc2 = None if fc1 is None else _packed_args(mlp.fc2, x, mlp.fc1.out_features, C)
    if norm is None or fc2 is None:
        return None
    return (*norm, *fc1, *fc2)


def native_block_serves(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[bool, bool]:
    """The dispatch rule of `FusedBlock`'s native inference path, per half: ``(attention half, MLP
    half)``. A half runs as one C++ call (`fasttrack._C.cpu.vit_attn_residual` /
    ``vit_mlp_residual``, both: ``vit_block``) — the same registered ops the Python path runs, in
    the same order, so the output is bit-identical — when:
    - `fasttrack._C` is loaded, and the `_attention` op call would run its C++ CPU kernel directly
      (`fasttrack.ops._registry.calls_cpu_kernel`: backend auto / native, a plain CPU tensor, no
      gradient, tracing, dispatch mode or functorch transform);
    - x is a contiguous ``[B, N, C]``, no key mask, drop-path / dropouts inactive (eval or p = 0);
    - the norm is exactly `nn.LayerNorm` over C; the linears are `FastLinear` taking the packed path
      (`fasttrack.nn.linear.packable`), sized C -> 3C -> C (attention) and C -> hidden -> C (MLP);
    - attention: the kernel's vectorised path serves dtype and head dim (`fast_path_serves`);
      MLP: the activation is the exact (erf) `nn.GELU`.
    Otherwise that half runs in Python as before. The gain is the Python between the ops (module
    calls, wrappers, argument checks), which costs far more between GEMMs that evict its code and
    data than in a hot loop: OSTrack-256 block, 320 tokens, bf16, one Zen 4 core, interleaved
    medians (rotated order, 40 rounds): 26.1 ms through the modules' Python path, 25.6–25.8 calling
    the same ops from one Python function, 25.5 native (whole trackers: ~0.3 ms less per block)."""
    return _native_attn_args(block, x, mask) is not None, _native_mlp_args(block, x) is not None


class FusedBlock(nn.Module):
    """`Block` with `FusedAttention` / `FusedMlp`; residual adds fused into proj / fc2 when
    drop-path is the identity (eval, or drop_path=0). Same constructor, keys and forward."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        _init_block_parts(self, FusedAttention, FusedMlp, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop,
                          drop_path, act_layer, norm_layer)

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedBlock":
        """Share ``ref_module``'s norms, attention and MLP parameters (``norm1``, ``attn``,
        ``norm2``, ``mlp``, optional ``drop_path``)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        share_block_parts(m, ref_module, cls.__name__)
        return m

    def attn_residual(self, x, mask=None, native_args=None):
        """``(x + drop_path(attn(norm1(x))), q, k, attn map or None)`` (`FusedAttention.forward_qk`;
        one C++ call where `native_block_serves`). ``native_args``: this block's `native_plan` entry."""
        args = _half_args(self, native_args, 0, x, mask)
        if args is not None:
            y, qkv = _NATIVE.vit_attn_residual(x, *args)
            q, k, _ = self.attn._split(qkv)
            return y, q, k, None
        return self._attn_residual_python(x, mask)

    def _attn_residual_python(self, x, mask):
        if identity_like(self.drop_path):
            return self.attn.forward_qk(norm_forward(self.norm1, x), mask, residual=x)
        y, q, k, attn = self.attn.forward_qk(norm_forward(self.norm1, x), mask)
        return x + self.drop_path(y), q, k, attn

    def mlp_residual(self, x, native_args=None):
        """``x + drop_path(mlp(norm2(x)))`` (one C++ call where `native_block_serves`)."""
        args = _half_args(self, native_args, 1, x)
        if args is not None:
            return _NATIVE.vit_mlp_residual(x, *args)
        if identity_like(self.drop_path):
            return self.mlp.forward_add(norm_forward(self.norm2, x), x)
        return x + self.drop_path(self.mlp(norm_forward(self.norm2, x)))

    def forward(self, x, mask=None, return_attention=False, *, native_args=None):
        """``native_args``: this block's `native_plan` entry (fasttrack's backbones pass it)."""
        if isinstance(mask, bool):
            # OSTrack's vit.py Block is forward(x, return_attention): a patched one may be called so
            return_attention, mask = mask, None
        if return_attention:
            y, attn = self.attn(self.norm1(x), mask, True)
            x = x + self.drop_path(y)
        else:
            args = _half_args(self, native_args, 0, x, mask)
            if args is None:
                x = self._attn_residual_python(x, mask)[0]
            else:
                margs = _half_args(self, native_args, 1, x)
                if margs is not None:   # the whole block in one call
                    return _NATIVE.vit_block(x, *args, *margs)
                x = _NATIVE.vit_attn_residual(x, *args)[0]   # (q / k not needed: no split)
            attn = None
        x = self.mlp_residual(x, native_args)
        return (x, attn) if return_attention else x


class NativePlanEntry(NamedTuple):
    """One block's `native_plan` entry: each half's native arguments (None: that half runs in
    Python) and the token dtype they were decided for."""
    attn: tuple | None
    mlp: tuple | None
    dtype: torch.dtype


def _planned(entry: NativePlanEntry, half: int, x: torch.Tensor, mask=None):
    # What the plan decided from the first block's tokens and may no longer hold for this x: the
    # mask, contiguity (a gather, a caller), dtype, and a gradient (a trainable block in front of
    # frozen ones: the C++ call would cut the graph). Weights, modules and hooks are the forward's.
    if (mask is None and x.dtype == entry.dtype and x.is_contiguous()
            and not (x.requires_grad and torch.is_grad_enabled())):
        return entry[half]
    return None


def _half_args(block: nn.Module, entry: NativePlanEntry | None, half: int, x: torch.Tensor, mask=None):
    """A half's native arguments (0: attention, 1: MLP) or None: from the block's `native_plan`
    entry when it has one, else from the rule."""
    if entry is not None:
        return _planned(entry, half, x, mask)
    return _native_attn_args(block, x, mask) if half == 0 else _native_mlp_args(block, x)


@functools.lru_cache(maxsize=None)
def _takes_native_args(forward) -> bool:
    return "native_args" in inspect.signature(forward).parameters


def _calls_forward_directly(m: nn.Module) -> bool:
    # `m(...)` would be `type(m).forward(m, ...)`: torch's Module.__call__ fast path (no module or
    # global hooks), not compiled with `Module.compile`, no forward set on the instance (e.g.
    # `m.forward = torch.compile(m.forward)`), no __call__ of its own
    return not (m._backward_hooks or m._backward_pre_hooks or m._forward_hooks or m._forward_pre_hooks
                or m._compiled_call_impl is not None or "forward" in m.__dict__
                or type(m).__call__ is not nn.Module.__call__ or _global_hooks())


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    return bool(g._global_backward_pre_hooks or g._global_backward_hooks or g._global_forward_hooks
                or g._global_forward_pre_hooks)


def native_plan(blocks, x: torch.Tensor) -> list[NativePlanEntry | None]:
    """Per block of ``blocks`` (in order), the arguments of its native path for a forward whose
    tokens enter as ``x``, decided before the first block runs: a `NativePlanEntry` (each half's
    `native_block_serves` arguments, or None where that half runs in Python) for a `FusedBlock`
    whose forward takes ``native_args`` and which ``block(...)`` would call directly (no module or
    global hooks, not `Module.compile` d, no forward or __call__ of its own); None for every other
    block, and for all of them when x is not served (`native_block_serves`' x conditions: CPU
    inference call, ``[B, N, C]`` contiguous, ...). Use with `call_block`, in the same forward:
    a block re-checks what can change between blocks (x's mask, contiguity, dtype and gradient;
    otherwise that half runs in Python); modules, weights and hooks are taken as they were when the
    plan was made (a hook registered during the forward applies from the next one).

    Why: the rule reads every block's modules and weights (a content stamp each), and between two
    blocks' GEMMs that code and data are cold: both halves' rule cost ~124 µs per block after a
    64 MiB sweep vs ~33 µs back to back (ViT-B block, bf16, one Zen 4 core); calling ``forward``
    also skips torch's module call. Whole trackers, one Zen 4 core, bf16, interleaved medians with
    and without the plan: OSTrack-256 232.1 -> 229.6 ms (per-round ratio 0.986), CompressTracker-4
    117.4 -> 116.5 ms (0.993)."""
    if not blocks or not _native_x_served(x, None):
        return [None] * len(blocks)
    return [NativePlanEntry(_native_attn_args(b, x), _native_mlp_args(b, x), x.dtype)
            if isinstance(b, FusedBlock) and _takes_native_args(type(b).forward) and _calls_forward_directly(b)
            else None for b in blocks]


def call_block(block: nn.Module, planned: NativePlanEntry | None, *args, **kwargs):
    """``block(*args, **kwargs)``; with a `native_plan` entry, ``block.forward`` with it (what the
    call would run, minus the rule and torch's module call)."""
    if planned is None:
        return block(*args, **kwargs)
    return block.forward(*args, native_args=planned, **kwargs)


def drop_path_of(ref: nn.Module, who: str) -> nn.Module:
    """``ref.drop_path`` as Identity or our `DropPath` (timm's has the same rule and attribute; ours
    lets the fused blocks see when it is the identity and fuse the residual add). timm's newer
    blocks have ``drop_path1`` / ``drop_path2``: one DropPath of their (equal) rate serves both
    branches (each call draws its own mask)."""
    if hasattr(ref, "drop_path1") or hasattr(ref, "drop_path2"):
        rates = [float(getattr(getattr(ref, n, None), "drop_prob", 0.0) or 0.0) for n in ("drop_path1", "drop_path2")]
        if rates[0] != rates[1]:
            raise TypeError(f"{who}.from_reference: `drop_path1` and `drop_path2` drop at different rates {rates}")
        out = DropPath(rates[0]) if rates[0] > 0 else nn.Identity()
        out.train(ref.training)
        return out
    dp = getattr(ref, "drop_path", None)
    if dp is None or isinstance(dp, (nn.Identity, DropPath)):
        return nn.Identity() if dp is None else dp
    if type(dp).__name__ != "DropPath" or not hasattr(dp, "drop_prob"):
        raise TypeError(f"{who}.from_reference: `drop_path` is {type(dp).__name__}; expected Identity or DropPath")
    out = DropPath(float(dp.drop_prob or 0.0))
    out.train(dp.training)
    return out


def share_block_parts(fused: nn.Module, ref: nn.Module, who: str) -> None:
    """Give ``fused`` the reference block's norm1 / norm2 / drop_path modules and fused twins of
    its attention and MLP (all sharing the reference Parameters)."""
    _require(ref, ("norm1", "attn", "norm2", "mlp"), who)
    for name in ("norm1", "norm2"):
        if not isinstance(getattr(ref, name), nn.Module):
            raise TypeError(f"{who}.from_reference: `{name}` must be an nn.Module")
    fused.norm1 = ref.norm1
    fused.attn = FusedAttention.from_reference(ref.attn)
    fused.drop_path = drop_path_of(ref, who)
    fused.norm2 = ref.norm2
    fused.mlp = FusedMlp.from_reference(ref.mlp)
    fused.train(ref.training)


# --------------------------------------------------------------------------------------------
# patch_model (fasttrack.nn._recognizers): plain pre-norm ViT blocks (timm, OSTrack's vit.py)
# --------------------------------------------------------------------------------------------
def vit_block_parts(m) -> bool:
    """The timm / OSTrack pre-norm block structure the fused blocks rebuild: ``attn.qkv``,
    ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` linears, ``norm1``, ``norm2``, ``attn.num_heads``,
    ``attn.scale``."""
    return (all(is_linear(m, p) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
            and has_attrs(m, "norm1", "norm2", "attn.num_heads", "attn.scale"))


def block_dim(m) -> int:
    return int(m.attn.qkv.in_features)


def match_vit_block(m) -> bool:
    p = forward_params(m)
    return vit_block_parts(m) and not ({"global_index_template", "global_index_sz"} & p) and "x" in p


def probe_vit_block(m):
    return (probe_like(m, 2, 16, block_dim(m)),), {}


def fused_vit_block(m) -> FusedBlock:
    if getattr(m.attn, "fused_attn", True) is False:
        # timm's non-SDPA path (and AVTrack's, which adds 0.1 * attn**2 to the probabilities there)
        raise TypeError("the module's attention runs its explicit (non-SDPA) path, `attn.fused_attn=False`, which "
                        "the fused blocks do not reproduce")
    return FusedBlock.from_reference(m)


register_recognizer("vit.block", match_vit_block, fused_vit_block, probe=probe_vit_block)
