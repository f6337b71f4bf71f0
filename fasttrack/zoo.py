"""Tracker-sized networks of the four families, each as a (reference, fused) pair on one input.

Used by the demo (`python -m fasttrack.demo`), the whole-tracker benchmarks (`bench/bench_trackers.py`)
and `python -m bench profile`. Weights are random with a fixed seed (or a checkpoint for OSTrack);
the fused network always shares the reference network's parameters (`from_reference`).

`build(family, batch, dtype)` → `TrackerCase` with ``reference`` / ``fused`` modules (eval mode),
``inputs`` and ``parity(out_ref, out_fused)`` → ``{feature_max_abs, index_agreement, box_max_abs}``.
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

    def parity(self, out_ref, out_fused) -> dict:
        f_ref, f_fus = self.features(out_ref).float(), self.features(out_fused).float()
        res = dict(feature_max_abs=(f_ref - f_fus).abs().max().item(), index_agreement=None, box_max_abs=None)
        if self.indices is not None:
            pairs = list(zip(self.indices(out_ref), self.indices(out_fused)))
            total = sum(a.numel() for a, _ in pairs)
            same = sum((a.long() == b.long()).sum().item() for a, b in pairs)
            res["index_agreement"] = same / total if total else 1.0
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


def _ostrack(batch, dtype, config="vitb_256_mae_ce", checkpoint=None, seed=0):
    from fasttrack.nn.ostrack import OSTRACK_CONFIGS, FusedOSTrack, build_ostrack, ctr_point_mask
    torch.manual_seed(seed)
    ref = build_ostrack(config)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu")
        ref.load_state_dict(state.get("net", state), strict=True)
    ref, fused = _pair(ref, FusedOSTrack, dtype)
    t, s = OSTRACK_CONFIGS[config]
    z, x = _images(batch, t, s, dtype, torch.Generator().manual_seed(seed))
    return TrackerCase(f"OSTrack-{s}-CE", f"ViT-B/16 {t}/{s} px, CE at 3/6/9 keep 0.7, CENTER head", ref, fused,
                       (z, x, ctr_point_mask(batch, t // 16)), features=lambda o: o["backbone_feat"],
                       indices=_removed, boxes=lambda o: o["pred_boxes"])


def _utptrack_o(batch, dtype, seed=0):
    from fasttrack.nn.utptrack import FusedUTPTrackO, build_utptrack_o
    torch.manual_seed(seed)
    ref, fused = _pair(build_utptrack_o(), FusedUTPTrackO, dtype)
    inputs = ref.example_inputs(batch, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return TrackerCase("UTPTrack-O", "ViT-B/16 [x, static z, dynamic z], CE 3/6/9, DTE/STE 4/7/10", ref, fused,
                       inputs, features=lambda o: o["backbone_feat"], indices=lambda o: o["kept_indexes"],
                       boxes=lambda o: o["pred_boxes"])


def _etctrack(batch, dtype, seed=0):
    from fasttrack.nn.etctrack import ETCTrackEncoder, FusedETCTrackEncoder
    torch.manual_seed(seed)
    ref, fused = _pair(ETCTrackEncoder(keep_ratio=0.7, seed=seed), FusedETCTrackEncoder, dtype)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 5, 64, 768, generator=g).to(dtype)
    x = torch.randn(batch, 256, 768, generator=g).to(dtype)
    return TrackerCase("ETCTrack", "compressor T=5 L=64 r=0.7 + 4 HIBlocks x 3 ViT-B blocks", ref, fused, (z, x),
                       features=lambda o: torch.cat([o[0], o[1]], dim=1))


def _abtrack(batch, dtype, seed=0):
    from fasttrack.nn.abtrack import FusedABTrackBackbone, build_abtrack
    torch.manual_seed(seed)
    ref = build_abtrack(0.7, seed=seed)
    # one bypassed block (the first gated one) for every sample, the others run: a deterministic
    # stand-in for a trained gate, so the benchmark measures what the issue asks for
    gated = [b for b in ref.blocks if b.gate is not None]
    with torch.no_grad():
        for i, b in enumerate(gated):
            b.gate.weight.zero_()
            b.gate.bias.fill_(10.0 if i == 0 else -10.0)
    ref, fused = _pair(ref, FusedABTrackBackbone, dtype)
    z, x = _images(batch, 128, 256, dtype, torch.Generator().manual_seed(seed))
    return TrackerCase("ABTrack", "ViT-B/16 dims pruned to 0.7, one block bypassed", ref, fused, (z, x),
                       features=lambda o: o[0], indices=lambda o: [o[1]["skipped"]])


def _compresstracker(batch, dtype, seed=0):
    from fasttrack.nn.compresstracker import FusedCompressTracker, build_compresstracker
    torch.manual_seed(seed)
    ref, fused = _pair(build_compresstracker(4), FusedCompressTracker, dtype)
    z, x = _images(batch, 128, 256, dtype, torch.Generator().manual_seed(seed))
    return TrackerCase("CompressTracker-4", "4 student blocks (ViT-B/16), CENTER head", ref, fused, (z, x),
                       features=lambda o: o["backbone_feat"], boxes=lambda o: o["pred_boxes"])


FAMILIES = {
    "ostrack": _ostrack,
    "utptrack-o": _utptrack_o,
    "etctrack": _etctrack,
    "abtrack": _abtrack,
    "compresstracker": _compresstracker,
}


def build(family: str, batch: int = 1, dtype: torch.dtype = torch.float32, **kw) -> TrackerCase:
    if family not in FAMILIES:
        raise ValueError(f"fasttrack.zoo.build: `family` must be one of {list(FAMILIES)}, got {family!r}")
    return FAMILIES[family](batch, dtype, **kw)
