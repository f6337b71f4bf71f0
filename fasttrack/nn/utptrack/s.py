"""UTPTrack-S: SUTrack's Fast-iTPN block (subln attention, SwiGLU, layer scale) with UTPTrack's
pruning (CE / DTE / STE plus the text-guided row). The rule: `fasttrack.nn.utptrack`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


from fasttrack.nn.ce import Scorer, active_ratio
from fasttrack.nn.derived import Derived
from fasttrack.nn.linear import packable
from fasttrack.nn._recognizers import forward_params, has_attrs, is_linear, probe_like, register_recognizer
from fasttrack.nn.vit import identity_like, drop_path_of, drop_path_or_identity, sdpa_is_faster
from fasttrack.nn.utptrack.pruning import PRUNING_ARGS, block_outputs, probe_index, prune_groups

__all__ = ["ITPNAttention", "SwiGLU", "UTPTrackSBlock", "FusedUTPTrackSBlock"]


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
        return block_outputs((xz,) + res[1:], attn)


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
        return (packable(x, a.q_proj.weight, a.q_bias) and packable(x, self.mlp.w1.weight, self.mlp.w1.bias)
                and packable(x, self.gamma_1, None) and identity_like(self.drop_path)
                and identity_like(a.proj_drop) and identity_like(self.mlp.drop) and isinstance(self.mlp.act, nn.SiLU))

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
        return block_outputs((xz,) + res[1:], attn)


# --------------------------------------------------------------------------------------------
# patch_model (fasttrack.nn._recognizers): UTPTrack-O / UTPTrack-S pruning blocks
# --------------------------------------------------------------------------------------------
_PRUNING_ARGS = {"global_index_sz", "global_index_dz", "global_index_x"}
def match_utptrack_s_block(m) -> bool:
    return (all(is_linear(m, p) for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.w1", "mlp.w2",
                                           "mlp.w3"))
            and has_attrs(m, "norm1", "norm2", "gamma_1", "gamma_2", "mlp.ffn_ln")
            and PRUNING_ARGS <= forward_params(m))


def probe_utptrack_s_block(m):
    """[cls | search 12 | static z 4 | dynamic z 4 | text], two templates, no task index."""
    C = m.attn.q_proj.in_features
    return (probe_like(m, 2, 22, C),), dict(global_index_sz=probe_index(m, 0, 4), global_index_dz=probe_index(m, 4, 4),
                                            global_index_x=probe_index(m, 0, 12), num_template=2)


def fused_utptrack_s_block(m) -> FusedUTPTrackSBlock:
    if getattr(m, "postnorm", False) or getattr(m, "deepnorm", False):
        raise TypeError("Fast-iTPN postnorm / deepnorm blocks are not supported by FusedUTPTrackSBlock")
    return FusedUTPTrackSBlock.from_reference(m)


register_recognizer("utptrack_s.block", match_utptrack_s_block, fused_utptrack_s_block, probe=probe_utptrack_s_block)
