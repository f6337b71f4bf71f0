"""Tracker-sized networks of the four families, each as a (reference, fused) pair on one input.

Inputs follow the official trackers' test-time calls: OSTrack and UTPTrack-O score candidates from the
template centre (``ce_template_mask="ctr_point"``, the rows of OSTrack's CTR_POINT mask).

Used by the demo (`python -m fasttrack.demo`), the whole-tracker benchmarks (`bench/bench_trackers.py`)
and `python -m bench profile`. Weights are random with a fixed seed (or a checkpoint for OSTrack);
the fused network always shares the reference network's parameters (`from_reference`).

`build(family, batch, dtype, depth=None)` → `TrackerCase` with ``reference`` / ``fused`` modules
(eval mode), ``inputs``, ``extras`` (further modules to compare against, same inputs: ABTrack's
``dense`` un-pruned reference ViT and, at batch > 1, ``fused-all`` — the fused backbone running the
bypassed block on every sample) and ``parity(out_ref, out_fused)`` →
``{feature_max_abs, index_agreement, box_max_abs}``. ``depth`` builds a reduced variant (fewer
blocks; for the benchmarks' smoke mode and tests), ``None`` the real configuration.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class TrackerCase:
    family: str
    description: str
    reference: nn.Module
    fused: nn.Module
    inputs: tuple
    features: Callable            # output -> feature tensor compared for parity
    indices: Callable | None = None   # output -> list of int tensors (kept / removed indices)
    boxes: Callable | None = None     # output -> predicted boxes
    extras: dict = dataclasses.field(default_factory=dict)  # name -> module taking the same inputs

    def parity(self, out_ref, out_fused) -> dict:
        """``feature_max_abs``; ``index_agreement``: the fraction of kept / removed token indices
        the two outputs share, row by row as sets (bf16 rounding may reorder near-tied scores
        without changing the selection; boolean decisions are compared element-wise);
        ``index_order_equal``: every index tensor identical, order included; ``box_max_abs``."""
        f_ref, f_fus = self.features(out_ref).float(), self.features(out_fused).float()
        res = dict(feature_max_abs=(f_ref - f_fus).abs().max().item(), index_agreement=None,
                   index_order_equal=None, box_max_abs=None)
        if self.indices is not None:
            pairs = list(zip(self.indices(out_ref), self.indices(out_fused)))
            total = sum(a.numel() for a, _ in pairs)
            same = 0
            for a, b in pairs:
                if a.dtype == torch.bool:
                    same += (a == b).sum().item()
                else:
                    a, b = a.long().sort(-1).values, b.long().sort(-1).values
                    # rows are sets of distinct indices: count the shared ones
                    same += sum(int(torch.isin(ra, rb).sum()) for ra, rb in zip(a.reshape(-1, a.shape[-1]),
                                                                                  b.reshape(-1, b.shape[-1])))
            res["index_agreement"] = same / total if total else 1.0
            res["index_order_equal"] = all(a.shape == b.shape and torch.equal(a.long(), b.long()) for a, b in pairs)
        if self.boxes is not None:
            res["box_max_abs"] = (self.boxes(out_ref).float() - self.boxes(out_fused).float()).abs().max().item()
        return res


def _images(batch, template, search, dtype, gen):
    return (torch.randn(batch, 3, template, template, generator=gen).to(dtype),
            torch.randn(batch, 3, search, search, generator=gen).to(dtype))


def _pair(ref: nn.Module, fused_cls, dtype) -> tuple[nn.Module, nn.Module]:
    ref = ref.to(dtype).eval()
    return ref, fused_cls.from_reference(ref).eval()


def _removed(out):
    return [r for r in out["removed_indexes_s"] if r is not None]


def _ostrack(batch, dtype, config="vitb_256_mae_ce", checkpoint=None, seed=0, depth=None):
    from fasttrack.nn.ostrack import OSTRACK_CONFIGS, FusedOSTrack, build_ostrack
    torch.manual_seed(seed)
    ref = build_ostrack(config, depth=depth or 12)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu")
        ref.load_state_dict(state.get("net", state), strict=True)
    ref, fused = _pair(ref, FusedOSTrack, dtype)
    t, s = OSTRACK_CONFIGS[config]
    z, x = _images(batch, t, s, dtype, torch.Generator().manual_seed(seed))
    return TrackerCase(f"OSTrack-{s}-CE", f"ViT-B/16 {t}/{s} px, CE at 3/6/9 keep 0.7, CENTER head", ref, fused,
                       (z, x, "ctr_point"), features=lambda o: o["backbone_feat"],
                       indices=_removed, boxes=lambda o: o["pred_boxes"])


def _ostrack384(batch, dtype, seed=0, depth=None):
    return _ostrack(batch, dtype, "vitb_384_mae_ce", seed=seed, depth=depth)


def _utptrack_o(batch, dtype, seed=0, depth=None):
    from fasttrack.nn.utptrack import FusedUTPTrackO, build_utptrack_o
    torch.manual_seed(seed)
    ref, fused = _pair(build_utptrack_o(depth=depth or 12), FusedUTPTrackO, dtype)
    inputs = ref.example_inputs(batch, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return TrackerCase("UTPTrack-O", "ViT-B/16 [x, static z, dynamic z], CE 3/6/9, DTE/STE 4/7/10", ref, fused,
                       inputs, features=lambda o: o["backbone_feat"], indices=lambda o: o["kept_indexes"],
                       boxes=lambda o: o["pred_boxes"])


def _etctrack(batch, dtype, seed=0, depth=None):
    from fasttrack.nn.etctrack import ETCTrackEncoder, FusedETCTrackEncoder
    torch.manual_seed(seed)
    stages = 4 if depth is None else max(1, depth // 3)  # 3 ViT blocks per HIBlock
    ref, fused = _pair(ETCTrackEncoder(keep_ratio=0.7, seed=seed, num_stages=stages), FusedETCTrackEncoder, dtype)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 5, 64, 768, generator=g).to(dtype)
    x = torch.randn(batch, 256, 768, generator=g).to(dtype)
    # features: the search tokens (what the box head reads). They do not depend on the order of the
    # merged template tokens (attention over them is permutation-invariant), which bf16 rounding can
    # change where merge scores tie; in fp32 the merged tokens are compared too.
    feats = (lambda o: o[1]) if dtype == torch.bfloat16 else (lambda o: torch.cat([o[0], o[1]], dim=1))
    return TrackerCase("ETCTrack", "compressor T=5 L=64 r=0.7 + 4 HIBlocks x 3 ViT-B blocks", ref, fused, (z, x),
                       features=feats)


def _set_gates(ref, z, x, batch):
    """Stand-in for a trained gate, so the benchmarks measure what issue 8 asks for: the first
    gated block is bypassed by every sample at batch 1, by exactly half of the samples at batch > 1
    (its gate reads the bypass token along the direction where the samples' tokens spread most,
    thresholded between the two middle samples); every later gate runs its block."""
    gated = [i for i, b in enumerate(ref.blocks) if b.gate is not None]
    with torch.no_grad():
        for i in gated:
            ref.blocks[i].gate.weight.zero_()
            ref.blocks[i].gate.bias.fill_(-10.0)
        if not gated:
            return
        first = ref.blocks[gated[0]]
        if batch == 1:
            first.gate.bias.fill_(10.0)
            return
        t = ref.embed(z, x)
        for blk in ref.blocks[:gated[0]]:
            t = blk(t)[0]
        tok = t[:, -1].float()
        centred = tok - tok.mean(0)
        u = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        s = (centred @ u).sort().values
        lo, hi = s[(batch - 1) // 2], s[(batch - 1) // 2 + 1]
        scale = 20.0 / max(float(hi - lo), 1e-6)  # the middle pair lands at logits -10 / +10
        first.gate.weight.copy_((scale * u)[None])
        first.gate.bias.fill_(-scale * float(tok.mean(0) @ u + (lo + hi) / 2))


def _abtrack(batch, dtype, seed=0, depth=None):
    from fasttrack.nn.abtrack import ABTrackBackbone, FusedABTrackBackbone, build_abtrack
    depth = depth or 12
    n_enf = min(4, depth - 1)
    torch.manual_seed(seed)
    ref = build_abtrack(0.7, seed=seed, depth=depth, n_enf=n_enf)
    z, x = _images(batch, 128, 256, torch.float32, torch.Generator().manual_seed(seed))
    _set_gates(ref, z, x, batch)
    ref, fused = _pair(ref, FusedABTrackBackbone, dtype)
    # the yardstick: an un-pruned ViT-B of the same structure that never bypasses
    torch.manual_seed(seed)
    dense = ABTrackBackbone(depth=depth, n_enf=depth).to(dtype).eval()
    extras = {"dense": dense}
    if batch > 1:
        extras["fused-all"] = FusedABTrackBackbone.from_reference(ref, static=True).eval()
    what = "one block bypassed" if batch == 1 else "half the samples bypass one block"
    return TrackerCase("ABTrack", f"ViT-B/16 dims pruned to 0.7, {what}", ref, fused, (z.to(dtype), x.to(dtype)),
                       features=lambda o: o[0], indices=lambda o: [o[1]["skipped"]], extras=extras)


def _compresstracker(batch, dtype, seed=0, depth=None):
    from fasttrack.nn.compresstracker import FusedCompressTracker, build_compresstracker
    torch.manual_seed(seed)
    ref, fused = _pair(build_compresstracker(4 if depth is None or depth >= 4 else 2), FusedCompressTracker, dtype)
    z, x = _images(batch, 128, 256, dtype, torch.Generator().manual_seed(seed))
    return TrackerCase("CompressTracker-4", "4 student blocks (ViT-B/16), CENTER head", ref, fused, (z, x),
                       features=lambda o: o["backbone_feat"], boxes=lambda o: o["pred_boxes"])


FAMILIES = {
    "ostrack": _ostrack,
    "ostrack-384": _ostrack384,
    "utptrack-o": _utptrack_o,
    "etctrack": _etctrack,
    "abtrack": _abtrack,
    "compresstracker": _compresstracker,
}


def build(family: str, batch: int = 1, dtype: torch.dtype = torch.float32, **kw) -> TrackerCase:
    if family not in FAMILIES:
        raise ValueError(f"fasttrack.zoo.build: `family` must be one of {list(FAMILIES)}, got {family!r}")
    return FAMILIES[family](batch, dtype, **kw)
