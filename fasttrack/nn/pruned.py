"""ABTrack's dimension-pruned ViT: `PrunedLinear`, the pruned block and its masked dense twin.

ABTrack (no public code) prunes each block's embedding dimension with two learned diagonal 0/1
masks, D1 for the attention and D2 for the MLP:
    ``Y = MSA(LN(X)·D1; D1·W^{Q,K,V,O}) + X``,   ``Z = MLP(LN(Y)·D2; D2·W) + Y``.
What fasttrack implements (the pruned block and the masked dense reference state the same thing):
- ``attn.qkv`` takes D1 on its input, the output of norm1: ``qkv(LN1(x)·D1)``; fused with norm1
  (statistics over all d dims, only kept dims feed the product).
- ``attn.proj`` takes D1 on its input, the concatenated head outputs: ``proj(o·D1)`` — the ``D1·W^O``
  of the equation, W^O's rows being proj's input dims. With a head-aligned ranking
  (`fasttrack.prune.select_kept(..., per_head=True)`) every head keeps ``d*/N_h`` of its dims.
- ``mlp.fc1`` takes D2 on its input, the output of norm2: ``fc1(LN2(y)·D2)``, fused with norm2.
- ``mlp.fc2`` is dense: its input is the 4d hidden layer, on which D2 (a mask over d) is not
  defined, so ``D2·W`` acts on fc1 only.
So the equations' ``LN(X)·D1`` and ``D1·W`` are the same mask applied once; the pruned form
stores ``W[:, kept]`` (``[d_out, d*]``) and the kept indices as an int64 buffer ``in_index``.

`PrunedLinear` divides the work with the op `fasttrack.pruned_linear` as follows: the op (C++ on
CPU, Triton on CUDA) is the whole product and is what runs with autograd, on CUDA, for fp16/fp64
and on the non-native backends; for CPU fp32/bf16 inference the module runs the op's gather phase
(`_pruned_linear_gather`: one pass over x, fused LayerNorm) and then the packed GEMM (the panel GEMM
or oneDNN's, `fasttrack.nn.linear`) with its own cached pre-packed weight
(`fasttrack.nn.linear.PackedWeight`), which an op cannot keep across calls. On that path
`PrunedBlock` also runs fc1's exact GELU and the residual adds after proj / fc2 as epilogues of those
GEMMs (`PrunedLinear.forward_gelu` / `forward_add`), as `FusedBlock` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack import _extension, reference
from fasttrack.backend import current_backend
from fasttrack.nn.linear import (FastLinear, PackedWeight, packable, packed_linear, packed_linear_add,
                                 packed_linear_gelu)
from fasttrack.nn.vit import Block, identity_like, is_exact_gelu, linear_add
from fasttrack.ops.pruned_linear import gather_kept, pruned_linear

_grad_enabled = torch.is_grad_enabled

__all__ = ["PrunedLinear", "PrunedAttention", "PrunedMlp", "PrunedBlock", "MaskedBlock"]


def _check_norm(norm, d_in: int, who: str) -> None:
    if norm is None:
        return
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (d_in,):
        raise TypeError(f"{who}: `norm` must be an nn.LayerNorm over the last dim ({d_in}), got {norm!r}")


class PrunedLinear(nn.Module):
    """``LN?(x)[..., in_index] @ weight.T + bias`` with ``weight [out_features, d_kept]`` stored pruned.

    Parameters ``weight``, ``bias`` (optional), buffer ``in_index`` (int64 [d_kept]) and, when built
    with a LayerNorm, the submodule ``norm``. `forward(x, norm=...)` fuses a LayerNorm owned
    elsewhere (the pruned block passes its ``norm1`` / ``norm2``). Loading a state dict whose
    ``in_index`` has another length resizes the module (a pruned checkpoint loads into a module
    built with any kept count).
    """

    def __init__(self, in_features: int, out_features: int, in_index: torch.Tensor, bias: bool = True,
                 norm: nn.LayerNorm | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(in_index, torch.Tensor) or in_index.dim() != 1:
            raise TypeError("PrunedLinear: `in_index` must be a 1-D int64 tensor of kept input dims")
        _check_norm(norm, in_features, "PrunedLinear")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("in_index", in_index.to(device=device, dtype=torch.int64).clone())
        self.weight = nn.Parameter(torch.empty(out_features, in_index.numel(), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = norm
        self._packed = PackedWeight()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init, with the fan-in of the kept dims
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1]) if self.weight.shape[1] else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def d_kept(self) -> int:
        return self.in_index.numel()

    @classmethod
    def from_dense(cls, linear: nn.Linear, in_index: torch.Tensor, norm: nn.LayerNorm | None = None) -> "PrunedLinear":
        """Keep ``linear``'s input dims ``in_index`` (copies ``weight[:, in_index]``; ``bias`` and
        ``norm`` are shared). Indices are validated: in range and distinct."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"PrunedLinear.from_dense: `linear` must be an nn.Linear, got {type(linear).__name__}")
        if not isinstance(in_index, torch.Tensor) or in_index.dim() != 1 or in_index.dtype != torch.int64:
            raise TypeError("PrunedLinear.from_dense: `in_index` must be a 1-D int64 tensor")
        d_in = linear.in_features
        if in_index.numel() and (int(in_index.min()) < 0 or int(in_index.max()) >= d_in):
            raise ValueError(f"PrunedLinear.from_dense: `in_index` must be in [0, {d_in})")
        if in_index.unique().numel() != in_index.numel():
            raise ValueError("PrunedLinear.from_dense: `in_index` has repeated dims")
        w = linear.weight
        m = cls(d_in, linear.out_features, in_index, bias=linear.bias is not None, norm=norm, device="meta",
                dtype=w.dtype)
        m.in_index = in_index.to(device=w.device).clone()
        m.weight = nn.Parameter(w.detach().index_select(1, m.in_index).clone(), requires_grad=w.requires_grad)
        m.bias = linear.bias
        return m

    @classmethod
    def from_mask(cls, linear: nn.Linear, mask: torch.Tensor, norm: nn.LayerNorm | None = None) -> "PrunedLinear":
        """ABTrack's diagonal mask D = diag(mask) on the input: keeps the dims where ``mask != 0``."""
        if not isinstance(mask, torch.Tensor) or mask.shape != (linear.in_features,):
            raise ValueError(f"PrunedLinear.from_mask: `mask` must have shape [{linear.in_features}]")
        return cls.from_dense(linear, mask.nonzero().flatten().to(torch.int64), norm)

    def _norm_args(self, norm):
        norm = norm if norm is not None else self.norm
        if norm is None:
            return None
        _check_norm(norm, self.in_features, "PrunedLinear.forward")
        return norm.weight, norm.bias, norm.eps

    def uses_packed(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` takes the gather + pre-packed GEMM path (see the module doc)."""
        # a weight that no longer matches in_index (reassigned by hand) takes the op path, whose
        # check names the mismatch; the packed GEMM would fail with its own message instead
        return (_extension.loaded and current_backend() in ("auto", "native") and packable(x, self.weight, self.bias)
                and self.weight.shape[-1] == self.in_index.shape[0])

    def _gathered(self, x: torch.Tensor, ln) -> torch.Tensor | None:
        """The packed path's input ``LN?(x)[..., in_index]`` as ``[M, d_kept]``, or None when the
        op path runs (see the module doc)."""
        if (self.uses_packed(x)
                and (ln is None or not _grad_enabled() or not any(p is not None and p.requires_grad for p in ln[:2]))):
            ln_w, ln_b, eps = ln if ln is not None else (None, None, 1e-5)
            return gather_kept(x, self.in_index, ln_w, ln_b, eps, ln is not None)
        return None

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        ln = self._norm_args(norm)
        h = self._gathered(x, ln)
        if h is not None:
            out = packed_linear(h, self._packed.get(self.weight), self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return pruned_linear(x, self.weight, self.bias, self.in_index, ln)

    def forward_gelu(self, x: torch.Tensor, act: nn.Module, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``act(self(x, norm))``; on the packed path an exact GELU runs as the GEMM's epilogue,
        so the ``[M, out_features]`` activation is written once (`packed_linear_gelu`)."""
        if is_exact_gelu(act):
            h = self._gathered(x, self._norm_args(norm))
            if h is not None:
                out = packed_linear_gelu(h, self._packed.get(self.weight), self.bias)
                return out.view(*x.shape[:-1], self.out_features)
        return act(self(x, norm))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``residual + self(x, norm)``; on the packed path the add is the GEMM's epilogue
        (not differentiable: a residual that needs a gradient takes the plain sum)."""
        if (residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], self.out_features)
                and residual.is_contiguous() and not (_grad_enabled() and residual.requires_grad)):
            h = self._gathered(x, self._norm_args(norm))
            if h is not None:
                out = packed_linear_add(h, residual.view(h.shape[0], self.out_features),
                                        self._packed.get(self.weight), self.bias)
                return out.view(residual.shape)
        return residual + self(x, norm)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        idx = state_dict.get(prefix + "in_index")
        if isinstance(idx, torch.Tensor) and idx.shape != self.in_index.shape:
            # another kept count: take the checkpoint's shapes, then load as usual
            self.in_index = torch.empty(idx.shape, dtype=torch.int64, device=self.in_index.device)
            self.weight = nn.Parameter(self.weight.new_empty(self.out_features, idx.numel()),
                                       requires_grad=self.weight.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, kept={self.d_kept}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------
# The pruned ViT block (timm / OSTrack layout) and its masked dense reference twin
# --------------------------------------------------------------------------------------------
def _attend(qkv: torch.Tensor, num_heads: int, scale: float, mask, return_attention: bool, attn_drop: nn.Module):
    """Multi-head attention from a ``[B, N, 3C]`` qkv; ``mask [B, N]`` True = key masked out (OSTrack).
    The explicit softmax (the official math) when the map is wanted or dropout is live, else SDPA."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    if return_attention or not identity_like(attn_drop):
        attn = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            attn = attn.masked_fill(mask[:, None, None, :], float("-inf"))
        attn = attn_drop(attn.softmax(dim=-1))
        o = attn @ v
    else:
        attn = None
        keep = None if mask is None else ~mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return o.transpose(1, 2).reshape(B, N, C), attn


class PrunedAttention(nn.Module):
    """``qkv`` and ``proj`` pruned on their inputs by the same kept dims (D1), see the module doc."""

    def __init__(self, qkv: PrunedLinear, proj: PrunedLinear, num_heads: int, scale: float,
                 attn_drop: nn.Module | None = None, proj_drop: nn.Module | None = None):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.qkv, self.proj = qkv, proj
        self.attn_drop = attn_drop if attn_drop is not None else nn.Identity()
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    def forward(self, x, norm=None, mask=None, return_attention=False):
        o, attn = _attend(self.qkv(x, norm), self.num_heads, self.scale, mask, return_attention, self.attn_drop)
        y = self.proj_drop(self.proj(o))
        return (y, attn) if return_attention else y

    def forward_add(self, x, residual, norm=None, mask=None, return_attention=False):
        """``residual + self(x, ...)`` with the add fused into proj when nothing sits between them."""
        o, attn = _attend(self.qkv(x, norm), self.num_heads, self.scale, mask, return_attention, self.attn_drop)
        y = self.proj.forward_add(o, residual) if identity_like(self.proj_drop) else residual + self.proj_drop(self.proj(o))
        return (y, attn) if return_attention else y


class PrunedMlp(nn.Module):
    """``fc1`` pruned on its input (D2), ``fc2`` dense (a `FastLinear`)."""

    def __init__(self, fc1: PrunedLinear, act: nn.Module, fc2: nn.Linear, drop: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x, norm=None):
        return self.drop(self.fc2(self.drop(self.fc1.forward_gelu(x, self.act, norm))))

    def forward_add(self, x, residual, norm=None):
        """``residual + self(x, norm)`` with the add fused into fc2 when nothing sits between them."""
        h = self.fc1.forward_gelu(x, self.act, norm)
        if identity_like(self.drop):   # eval: no dropout call (one dispatch fewer per block)
            return linear_add(self.fc2, h, residual)
        return residual + self.drop(self.fc2(self.drop(h)))


class PrunedBlock(nn.Module):
    """A pre-norm ViT block pruned à la ABTrack. State-dict keys follow timm / OSTrack (``norm1``,
    ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) plus the ``in_index``
    buffers; ``norm1`` / ``norm2`` are fused into qkv / fc1 (`fasttrack.pruned_linear` with norm)."""

    def __init__(self, norm1: nn.LayerNorm, attn: PrunedAttention, norm2: nn.LayerNorm, mlp: PrunedMlp,
                 drop_path: nn.Module | None = None):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path = drop_path if drop_path is not None else nn.Identity()

    @classmethod
    def from_dense(cls, block: nn.Module, attn_index: torch.Tensor, mlp_index: torch.Tensor) -> "PrunedBlock":
        """Prune a dense block (timm / OSTrack layout, e.g. `fasttrack.nn.vit.Block`): qkv and proj
        keep input dims ``attn_index`` (D1), fc1 keeps ``mlp_index`` (D2). Weights of the kept dims
        are copied; norms, biases, fc2 and the dropout modules are shared."""
        missing = [n for n in ("norm1", "attn", "norm2", "mlp") if not hasattr(block, n)]
        if missing:
            raise TypeError(f"PrunedBlock.from_dense: `block` ({type(block).__name__}) lacks {missing}")
        a, m = block.attn, block.mlp
        qkv = PrunedLinear.from_dense(a.qkv, attn_index)
        proj = PrunedLinear.from_dense(a.proj, attn_index)
        attn = PrunedAttention(qkv, proj, a.num_heads, a.scale, getattr(a, "attn_drop", None),
                               getattr(a, "proj_drop", None))
        fc2 = m.fc2 if isinstance(m.fc2, FastLinear) else FastLinear.from_linear(m.fc2)
        mlp = PrunedMlp(PrunedLinear.from_dense(m.fc1, mlp_index), m.act, fc2, getattr(m, "drop", None))
        return cls(block.norm1, attn, block.norm2, mlp, getattr(block, "drop_path", None))

    @classmethod
    def empty(cls, dim: int, num_heads: int, attn_kept: int, mlp_kept: int, mlp_ratio: float = 4.0,
              qkv_bias: bool = True, device=None, dtype=None) -> "PrunedBlock":
        """An uninitialised block of the given kept counts, e.g. to `load_state_dict` a checkpoint."""
        kw = dict(device=device, dtype=dtype)
        hidden = int(dim * mlp_ratio)
        idx1, idx2 = torch.arange(attn_kept), torch.arange(mlp_kept)
        attn = PrunedAttention(PrunedLinear(dim, 3 * dim, idx1, bias=qkv_bias, **kw),
                               PrunedLinear(dim, dim, idx1, **kw), num_heads, (dim // num_heads) ** -0.5)
        mlp = PrunedMlp(PrunedLinear(dim, hidden, idx2, **kw), nn.GELU(), FastLinear(hidden, dim, **kw))
        return cls(nn.LayerNorm(dim, **kw), attn, nn.LayerNorm(dim, **kw), mlp)

    def forward(self, x, mask=None, return_attention=False):
        if identity_like(self.drop_path):  # the residual adds fused into proj / fc2 (packed path)
            y = self.attn.forward_add(x, x, self.norm1, mask, return_attention)
            x, attn = y if return_attention else (y, None)
            x = self.mlp.forward_add(x, x, self.norm2)
            return (x, attn) if return_attention else x
        y = self.attn(x, self.norm1, mask, return_attention)
        y, attn = y if return_attention else (y, None)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(x, self.norm2))
        return (x, attn) if return_attention else x


class MaskedBlock(Block):
    """The reference twin of `PrunedBlock`: a dense `fasttrack.nn.vit.Block` whose qkv / proj / fc1
    inputs are multiplied by the 0/1 masks ``mask1`` (D1) / ``mask2`` (D2) as stated in the module
    doc (`fasttrack.reference.masked_dense_linear`), attention in the official explicit math."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, **kw):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, **kw)
        self.register_buffer("mask1", torch.ones(dim))
        self.register_buffer("mask2", torch.ones(dim))

    @classmethod
    def from_block(cls, block: Block, mask1: torch.Tensor, mask2: torch.Tensor) -> "MaskedBlock":
        """Share ``block``'s modules; masks are 0/1 over the embedding dim."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for name in ("norm1", "attn", "drop_path", "norm2", "mlp"):
            setattr(m, name, getattr(block, name))
        m.register_buffer("mask1", mask1.clone())
        m.register_buffer("mask2", mask2.clone())
        return m

    def forward(self, x, mask=None, return_attention=False):
        a, mlp = self.attn, self.mlp
        qkv = reference.masked_dense_linear(self.norm1(x), a.qkv.weight, a.qkv.bias, self.mask1)
        o, attn = _attend(qkv, a.num_heads, a.scale, mask, True, a.attn_drop)
        x = x + self.drop_path(a.proj_drop(reference.masked_dense_linear(o, a.proj.weight, a.proj.bias, self.mask1)))
        h = mlp.act(reference.masked_dense_linear(self.norm2(x), mlp.fc1.weight, mlp.fc1.bias, self.mask2))
        x = x + self.drop_path(mlp.drop(mlp.fc2(mlp.drop(h))))
        return (x, attn) if return_attention else x
