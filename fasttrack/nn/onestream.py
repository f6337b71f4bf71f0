"""The OSTrack-style one-stream tracker network: a ViT backbone over [template, search] tokens and
OSTrack's CENTER head (``lib/models/ostrack/ostrack.py::OSTrack``), with the per-frame `track` API.

Shared by the families built on OSTrack's network: `fasttrack.nn.ostrack` (OSTrack),
`fasttrack.nn.compresstracker` (CompressTracker's student), and UTPTrack-O's head read.
"""
from __future__ import annotations

from torch import nn

from fasttrack.nn.cuda_graph import GraphedStep, require_graph_inputs
from fasttrack.nn.derived import TransientState
from fasttrack.nn.head import CenterPredictor

__all__ = ["OneStreamTracker", "FusedOneStreamTracker"]


class OneStreamTracker(TransientState, nn.Module):
    """OSTrack's network (reference), shared by the trackers built on it (OSTrack, CompressTracker;
    UTPTrack-O reads its head with `forward_head`): ``backbone`` + CENTER ``box_head``.

    forward(template, search, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False) ->
    dict with ``pred_boxes [B, 1, 4]`` (cx, cy, w, h normalised), ``score_map``, ``size_map``,
    ``offset_map``, ``attn``, ``removed_indexes_s``, ``backbone_feat`` — as the official forward.
    The backbone takes ``(z, x, ce_template_mask=, ce_keep_rate=)`` and, for `track`, ``z_tokens=``
    with ``embed_template``.
    """

    def __init__(self, backbone: nn.Module, box_head: CenterPredictor):
        super().__init__()
        self.backbone = backbone
        self.box_head = box_head
        self.feat_sz_s = int(box_head.feat_sz)
        self.feat_len_s = self.feat_sz_s ** 2
        if backbone.feat_sz_x != self.feat_sz_s:
            raise ValueError(f"`box_head.feat_sz` ({self.feat_sz_s}) must equal the search feature size "
                             f"({backbone.feat_sz_x})")

    # The reference head gets what the official forward_head gives it, a contiguous NCHW map (a
    # strided view changes the convolution algorithm at B > 1: outputs off by ~3e-6); the fused head
    # reads the tokens as a channels-last map, which its packed convolutions want anyway.
    _head_channels_last = False
    _transient = ("_track_z", "_track_graph")

    def forward_head(self, cat_feature, gt_score_map=None):
        B = cat_feature.shape[0]
        fs = self.feat_sz_s
        enc = cat_feature[:, -self.feat_len_s:].transpose(1, 2)                 # [B, C, HW]
        opt = enc.unflatten(2, (fs, fs)) if self._head_channels_last else enc.contiguous().view(B, -1, fs, fs)
        score_map, bbox, size_map, offset_map = self.box_head(opt, gt_score_map)
        return {"pred_boxes": bbox.view(B, 1, 4), "score_map": score_map, "size_map": size_map,
                "offset_map": offset_map}

    def forward(self, template, search, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False):
        x, aux = self.backbone(template, search, ce_template_mask=ce_template_mask, ce_keep_rate=ce_keep_rate)
        return self._finish(x, aux)

    def _finish(self, x, aux):
        out = self.forward_head(x)
        out.update(aux)
        out["backbone_feat"] = x
        return out

    def track(self, search, template=None, ce_template_mask=None, ce_keep_rate=None, cuda_graph=False):
        """Opt-in per-frame API that reuses the template's work across frames.

        Exactness: only the search-independent part is reused — the template's patch + positional
        embedding. In a one-stream ViT the template tokens attend to the search tokens in every
        block (and CE scores come from that joint attention), so no block output of the template
        can be reused exactly. Give ``template`` on the first frame and whenever it changes;
        ``None`` reuses the cached embedding, which holds the values computed with the weights of
        that call (give the template again after changing weights). In eval mode the result equals
        ``forward(last template, search, ...)`` exactly (the same ops on the same values); in
        training mode ``pos_drop`` would draw new dropout masks, so this is an inference API.

        ``ce_template_mask``: as `forward`, plus ``"ctr_point"`` — the official tracker's setting
        (``CE_TEMPLATE_RANGE='CTR_POINT'``: the template centre scores the candidates) without a
        mask tensor; the official tracker passes that mask, so use it to track as OSTrack does.
        ``None`` scores with every template row (the network's default, not the tracker's).

        ``cuda_graph=True`` (CUDA tensors only): the step after the template embedding runs as one
        CUDA-graph replay per input shape (`fasttrack.nn.cuda_graph`; the outputs are the capture's
        buffers, overwritten by the next call), with the same values as the eager step.
        ``ce_template_mask`` must then be None, "ctr_point" or an int64 row index [B, R]: a bool
        mask names its rows by value, which a graph cannot read.
        """
        if not hasattr(self.backbone, "embed_template"):
            raise TypeError(f"track: the backbone ({type(self.backbone).__name__}) has no `embed_template`")
        if cuda_graph:
            require_graph_inputs(f"{type(self).__name__}.track", ce_template_mask, search=search, template=template)
        if template is not None:
            self._track_z = self.backbone.embed_template(template)
        z = self.__dict__.get("_track_z")
        if z is None:
            raise ValueError("track: pass `template` on the first call")
        if z.shape[0] != search.shape[0]:
            raise ValueError(f"track: `search` has batch {search.shape[0]}, the cached template {z.shape[0]}")
        if cuda_graph:
            step = self.__dict__.get("_track_graph")
            if step is None:
                step = self.__dict__["_track_graph"] = GraphedStep(self._track_step,
                                                                   name=f"{type(self).__name__}.track")
            return step(search, z, ce_template_mask, ce_keep_rate)
        return self._track_step(search, z, ce_template_mask, ce_keep_rate)

    def _track_step(self, search, z, ce_template_mask, ce_keep_rate):
        x, aux = self.backbone(None, search, ce_template_mask=ce_template_mask, ce_keep_rate=ce_keep_rate, z_tokens=z)
        return self._finish(x, aux)


class FusedOneStreamTracker(OneStreamTracker):
    """`OneStreamTracker` with a fused backbone and head: the head reads the tokens as a
    channels-last map (what the fused head's packed convolutions want)."""

    _head_channels_last = True
