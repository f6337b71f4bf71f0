"""Candidate-selection pieces shared by every CE-family block (OSTrack, UTPTrack-O/S): which
template rows score the candidates, where the scores come from, and OSTrack's activation rule.

The query rows are the one place where a CE forward could need the host: a bool template mask
names its rows by value. `ce_query_index` therefore takes the mask in four forms —
- ``None``: every template row (the network's default);
- ``"ctr_point"``: the template centre, OSTrack's test-time ``CE_TEMPLATE_RANGE='CTR_POINT'``;
- an int64 tensor ``[B, R]``: the rows themselves (what the backbones pass to their blocks);
- a bool tensor ``[B, lens_t]`` (OSTrack's ``generate_mask_cond``): its True positions. Their count R
  is read back from the device once per mask tensor (one host synchronisation; the result is
  remembered for that tensor object until it is modified), unless the caller gives ``count``.
The first three never read a value on the host, so a forward given them is free of device→host
synchronisations and can be captured in a CUDA graph.
"""
from __future__ import annotations

import weakref

import torch

from fasttrack.backend import capturing_graph, exporting_to_onnx
from fasttrack.ops import topk_select, topk_select_qk
from fasttrack.reference import descending_order, keep_count

__all__ = ["CTR_POINT", "ctr_point_mask", "ctr_point_index", "index_range", "ce_query_index", "mask_query_count", "Scorer",
           "active_ratio", "check_index", "template_mask"]

CTR_POINT = "ctr_point"
# OSTrack ``generate_mask_cond`` (CTR_POINT): the centre row/column of a template feature map
_CENTRE = {8: 3, 12: 5, 7: 3, 14: 6}


def _centre(template_feat_size: int, who: str) -> int:
    if template_feat_size not in _CENTRE:
        raise ValueError(f"{who}: `template_feat_size` must be one of {sorted(_CENTRE)}, got {template_feat_size}")
    return _CENTRE[template_feat_size]


def ctr_point_mask(batch: int, template_feat_size: int, device=None) -> torch.Tensor:
    """OSTrack ``generate_mask_cond`` with ``CE_TEMPLATE_RANGE='CTR_POINT'``: ``[B, S*S]`` bool,
    True at the template centre (row 3 of 8, 5 of 12, 3 of 7, 6 of 14)."""
    c = _centre(template_feat_size, "ctr_point_mask")
    m = torch.zeros(batch, template_feat_size, template_feat_size, dtype=torch.bool, device=device)
    m[:, c, c] = True
    return m.flatten(1)


# Constant index tensors (all template rows, the centre row), by (kind, batch, lens_t, offset,
# device). They are only ever read, so one tensor per key serves every call.
_CONSTANTS: dict = {}


_MODE_KEYS = tuple(torch._C._TorchDispatchModeKey.__members__.values())   # fake, proxy, functional


def _tracing() -> bool:
    """Tracing, fake tensors, or CUDA-graph capture (whose allocations hold nothing until replayed)."""
    if capturing_graph() or any(torch._C._get_dispatch_mode(k) is not None for k in _MODE_KEYS):
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _constant(key, make):
    if _tracing():
        return make()   # traced / fake tensors must not outlive their trace
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:   # bounded: a long-running process with many shapes
            _CONSTANTS.clear()
        with torch.inference_mode(False), torch.no_grad():   # a plain tensor, usable under autograd too
            t = _CONSTANTS[key] = make()
    return t


def index_range(batch: int, start: int, stop: int, device) -> torch.Tensor:
    """``arange(start, stop)`` expanded to ``[B, stop - start]`` int64 (contiguous): a cached
    constant (token positions, every template row)."""
    device = torch.device(device)
    return _constant(("range", batch, start, stop, device),
                     lambda: torch.arange(start, stop, device=device).expand(batch, stop - start).contiguous())


def ctr_point_index(batch: int, lens_t: int, offset: int, device) -> torch.Tensor:
    """The centre row of a square template of ``lens_t`` tokens, shifted by ``offset``: ``[B, 1]``."""
    lens_t = int(lens_t)   # a traced shape (torch.jit.trace) is a tensor
    side = int(round(lens_t ** 0.5))
    if side * side != lens_t:
        raise ValueError(f"ce_template_mask='ctr_point' needs a square template, got {lens_t} tokens")
    c = _centre(side, "ce_template_mask='ctr_point'")
    device = torch.device(device)
    return _constant(("ctr", batch, lens_t, offset, device),
                     lambda: torch.full((batch, 1), c * side + c + offset, dtype=torch.int64, device=device))


# The counts of the last bool masks seen, by id() with a weak reference that proves the object is
# still the same (a WeakKeyDictionary would compare tensors with ==, elementwise): a backbone passes
# the same mask object to every block, so its count is read back once per forward.
_MASK_COUNTS: dict[int, tuple] = {}


def mask_query_count(mask: torch.Tensor) -> int:
    """The number of True entries per row of a bool ``[B, lens_t]`` mask (the same in every row,
    as OSTrack's ``view(bs, hn, -1, L)`` requires): one host read per mask tensor, remembered until
    the tensor is modified in place."""
    if torch.compiler.is_exporting() or exporting_to_onnx():
        raise ValueError("exporting with a bool `ce_template_mask` is not supported: the number of query rows "
                         "it selects is data, and it fixes the graph's shapes. Pass ce_template_mask='ctr_point' "
                         "(OSTrack's CTR_POINT) or an int64 row index [B, R] instead.")
    version = mask._version
    hit = _MASK_COUNTS.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == version:
        return hit[2]
    counts = mask.sum(1)
    r = int(counts[0]) if counts.numel() else 0
    if r == 0 or bool((counts != r).any()):
        raise ValueError("`ce_template_mask` must select the same, non-zero number of template tokens in every sample")
    if len(_MASK_COUNTS) >= 8:
        _MASK_COUNTS.clear()
    _MASK_COUNTS[id(mask)] = (weakref.ref(mask), version, r)
    return r


def ce_query_index(ce_template_mask, batch: int, lens_t: int, offset: int, device, count: int | None = None
                   ) -> torch.Tensor:
    """The attention rows that score candidates, ``[B, R]`` int64, shifted by ``offset`` (the
    template's first position): see the module docstring for the accepted forms. ``count`` (bool
    masks only): the number of True entries per row, known to the caller — then nothing is read on
    the host (the rows are the first ``count`` True positions of each row)."""
    if ce_template_mask is None:
        return index_range(batch, offset, offset + lens_t, device)
    if isinstance(ce_template_mask, str):
        if ce_template_mask != CTR_POINT:
            raise ValueError(f"`ce_template_mask` must be None, {CTR_POINT!r}, a bool mask [B, lens_t] or an int64 "
                             f"index [B, R], got {ce_template_mask!r}")
        return ctr_point_index(batch, lens_t, offset, device)
    if not isinstance(ce_template_mask, torch.Tensor) or ce_template_mask.dtype not in (torch.bool, torch.int64):
        raise TypeError("`ce_template_mask` must be None, 'ctr_point', a bool tensor [B, lens_t] or an int64 "
                        "index tensor [B, R]")
    if ce_template_mask.dim() != 2 or ce_template_mask.shape[0] != batch:
        raise ValueError(f"`ce_template_mask` must have shape [{batch}, {lens_t}] (bool) or [{batch}, R] (int64), "
                         f"got {list(ce_template_mask.shape)}")
    if ce_template_mask.dtype == torch.int64:
        return ce_template_mask + offset if offset else ce_template_mask
    if ce_template_mask.shape[1] != lens_t:
        raise ValueError(f"`ce_template_mask` must have shape [{batch}, {lens_t}], got {list(ce_template_mask.shape)}")
    r = mask_query_count(ce_template_mask) if count is None else count
    # the True positions first, in index order (ONNX TopK takes no bool)
    rows = descending_order(ce_template_mask.to(torch.int32) if exporting_to_onnx() else ce_template_mask)[:, :r]
    return rows + offset if offset else rows


def template_mask(ce_template_mask, batch: int, lens_t: int, device) -> tuple[torch.Tensor | None, int | None]:
    """``(bool mask [B, lens_t] or None, True entries per row)`` for blocks that need the mask
    itself (UTPTrack's STE adds it to the scores and carries it through the pruning): ``"ctr_point"``
    becomes a cached centre mask (count 1), an int64 index ``[B, R]`` a mask scattered from it (count R),
    a bool mask is kept (its count read back once per mask tensor, `mask_query_count`)."""
    if ce_template_mask is None:
        return None, None
    if isinstance(ce_template_mask, str):
        rows = ce_query_index(ce_template_mask, batch, lens_t, 0, device)
        side = int(round(int(lens_t) ** 0.5))
        return _constant(("ctr_mask", batch, lens_t, torch.device(device)),
                         lambda: ctr_point_mask(batch, side, device)), rows.shape[1]
    if isinstance(ce_template_mask, torch.Tensor) and ce_template_mask.dtype == torch.int64:
        rows = ce_query_index(ce_template_mask, batch, lens_t, 0, device)
        mask = torch.zeros(batch, lens_t, dtype=torch.bool, device=device).scatter_(1, rows, True)
        return mask, rows.shape[1]
    ce_query_index(ce_template_mask, batch, lens_t, 0, device)   # validates, and remembers the count
    return ce_template_mask, mask_query_count(ce_template_mask)


class Scorer:
    """Where a block's CE scores come from: the attention map (reference; fused when a map was
    asked for) or q / k (fused, SDPA). One object per block call."""

    __slots__ = ("attn", "q", "k", "scale")

    def __init__(self, attn=None, q=None, k=None, scale=None):
        self.attn, self.q, self.k, self.scale = attn, q, k, scale

    def select(self, x, query_index, keep_ratio, start, length, global_index, query_weight=None, bonus=None):
        """`topk_select` / `topk_select_qk` over candidates ``[start, start + length)``; returns
        ``None`` when nothing would be removed (the official functions return their input then)."""
        if keep_count(keep_ratio, length) == length:
            return None
        kw = dict(start=start, length=length, query_weight=query_weight, bonus=bonus, global_index=global_index)
        if self.attn is not None:
            return topk_select(self.attn, x, query_index, keep_ratio, **kw)
        return topk_select_qk(self.q, self.k, x, query_index, keep_ratio, scale=self.scale, **kw)


def active_ratio(own_ratio: float, given) -> float | None:
    """OSTrack's rule: CE runs when the block's ratio < 1 and the call's ratio (if any) < 1; the
    call's ratio wins."""
    if own_ratio < 1 and (given is None or given < 1):
        return own_ratio if given is None else given
    return None


def official_repad(search: torch.Tensor, gi_s: torch.Tensor, removed: list, lens_x: int) -> torch.Tensor:
    """OSTrack's re-padding of the kept search tokens (``vit_ce.py::forward_features``): append zeros,
    scatter ``[kept, removed]`` indices back in place -> ``[B, lens_x, C]``. The zero pad takes the
    tokens' dtype (OSTrack creates it in the default dtype, which turns a bf16 / fp16 network's output
    into fp32 and breaks its head). The fused backbones use `fasttrack.ops.pad_scatter` instead."""
    B, _, C = search.shape
    removed_cat = torch.cat(removed, dim=1)
    pad = search.new_zeros(B, lens_x - search.shape[1], C)
    search = torch.cat([search, pad], dim=1)
    index_all = torch.cat([gi_s, removed_cat], dim=1)
    return torch.zeros_like(search).scatter_(1, index_all.unsqueeze(-1).expand(B, -1, C), search)


def check_index(t, name: str, batch: int):
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != batch:
        raise ValueError(f"`{name}` must be a [B={batch}, L] tensor, got "
                         f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"`{name}` must be int64 (fasttrack uses integer global indices), got {t.dtype}")
