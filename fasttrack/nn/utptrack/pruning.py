"""UTPTrack's pruning rule, shared by UTPTrack-O (`fasttrack.nn.utptrack.o`) and UTPTrack-S
(`fasttrack.nn.utptrack.s`): the family docstring (`fasttrack.nn.utptrack`) states it."""
from __future__ import annotations

import torch

from fasttrack.nn.ce import Scorer, ce_query_index, check_index, template_mask

__all__ = ["prune_groups", "UTPTRACK_O_LOCS", "UTPTRACK_S_LOCS", "PRUNING_ARGS", "probe_index", "block_outputs"]

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


def block_outputs(res, attn):
    """prune_groups' tuple -> the official block outputs (attn inserted before the masks)."""
    x, gsz, gdz, rsz, rdz, gx, rx, ctm, zim = res
    return x, gsz, gdz, rsz, rdz, gx, rx, attn, ctm, zim


# the forward arguments that mark a UTPTrack pruning block (`patch_model` recognizers)
PRUNING_ARGS = {"global_index_sz", "global_index_dz", "global_index_x"}


def probe_index(m, start, n):
    """``arange(start, start + n)`` for both samples of a recognizer probe (batch 2)."""
    return torch.arange(start, start + n, device=next(m.parameters()).device).expand(2, n)
