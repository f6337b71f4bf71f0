"""OSTrack's CENTER box head (``lib/models/layers/head.py::CenterPredictor``), reference and fused.

`CenterPredictor` restates the official module: three branches (centre score, offset, size) of
four conv(3x3)-BatchNorm-ReLU stages and a 1x1 conv; keys ``conv{1..4}_{ctr,offset,size}.{0,1}.*``
(0 = Conv2d, 1 = BatchNorm2d) and ``conv5_{ctr,offset,size}.*``. forward(x [B, C, H, W],
gt_score_map=None) -> (score_map_ctr, bbox [B, 4] (cx, cy, w, h, normalised), size_map,
offset_map).

`FusedCenterPredictor` shares those parameters and, for inference, runs the three branches as one
network: BatchNorm folded into the convs, the three first-stage convs concatenated into one conv,
the later stages as grouped convs (groups=3), the three 1x1 outputs as one grouped 1x1 conv (the
1-channel centre output padded to 2 with a zero filter). The folded weights are a cache rebuilt
when any parameter or BN buffer changes (`fasttrack.nn.derived.Derived`). When the packed path applies
(`fasttrack.nn.linear.packable`: CPU, fp32 / bf16, no gradient) every stage runs as a oneDNN
convolution on a weight pre-packed once into oneDNN's blocked layout, over the channels-last map
(the search tokens ``[B, HW, C]`` already are one): `F.conv2d` reorders the weight on every call.
Then torch's ReLU, which keeps NaN where oneDNN's post-op would zero it. First stage (C=768 ->
3x256, 3x3 on 16x16, ~80% of the head's FLOPs), median of 15 interleaved calls on one Zen 4 core:
bf16 11.3 ms packed vs 13.3 `F.conv2d` vs 12.8 im2col + packed GEMM (the previous path); fp32
23.1 vs 27.2 vs 25.4; on two cores bf16 5.8 vs 6.9 vs 7.1.

Dispatch rule (`FusedCenterPredictor.uses_folded` states it): the folded path runs in eval mode
when no gradient is needed (grad mode off, or neither x nor any head parameter requires grad);
otherwise the reference branches run (training-mode BatchNorm needs batch statistics, and the
folded weights are not differentiable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack.nn._recognizers import has_attrs, probe_like, register_recognizer
from fasttrack.nn.derived import Derived
from fasttrack.nn.linear import packable

__all__ = ["CenterPredictor", "FusedCenterPredictor", "conv_bn_relu"]

_BRANCHES = ("ctr", "offset", "size")
# The fused head's channel order, [ctr, (zero pad), size x2, offset x2]: the three sigmoid channels
# are adjacent, so one sigmoid + clamp covers them.
_FUSED_BRANCHES = ("ctr", "size", "offset")


def conv_bn_relu(in_planes, out_planes, kernel_size=3, stride=1, padding=1, dilation=1):
    """OSTrack ``conv()``: Conv2d(bias=True) -> BatchNorm2d -> ReLU as an nn.Sequential."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                  bias=True),
        nn.BatchNorm2d(out_planes),
        nn.ReLU(inplace=True))


def _sigmoid(x):
    return torch.clamp(x.sigmoid_(), min=1e-4, max=1 - 1e-4)


class CenterPredictor(nn.Module):
    """OSTrack CENTER head (reference)."""

    def __init__(self, inplanes=64, channel=256, feat_sz=20, stride=16):
        super().__init__()
        self.feat_sz = feat_sz
        self.stride = stride
        self.img_sz = feat_sz * stride
        outs = {"ctr": 1, "offset": 2, "size": 2}
        for b in _BRANCHES:
            setattr(self, f"conv1_{b}", conv_bn_relu(inplanes, channel))
            setattr(self, f"conv2_{b}", conv_bn_relu(channel, channel // 2))
            setattr(self, f"conv3_{b}", conv_bn_relu(channel // 2, channel // 4))
            setattr(self, f"conv4_{b}", conv_bn_relu(channel // 4, channel // 8))
            setattr(self, f"conv5_{b}", nn.Conv2d(channel // 8, outs[b], kernel_size=1))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _check(self, x):
        if x.dim() != 4 or x.shape[-2:] != (self.feat_sz, self.feat_sz) or x.shape[0] < 1:
            raise ValueError(f"CenterPredictor: `x` must be [B >= 1, C, {self.feat_sz}, {self.feat_sz}], "
                             f"got {list(x.shape)}")

    def get_score_map(self, x):
        maps = []
        for b in _BRANCHES:
            h = x
            for s in range(1, 6):
                h = getattr(self, f"conv{s}_{b}")(h)
            maps.append(h)
        ctr, offset, size = maps
        return _sigmoid(ctr), _sigmoid(size), offset

    def cal_bbox(self, score_map_ctr, size_map, offset_map, return_score=False):
        max_score, idx = torch.max(score_map_ctr.flatten(1), dim=1, keepdim=True)
        idx_y = torch.div(idx, self.feat_sz, rounding_mode="floor")
        idx_x = idx % self.feat_sz
        idx = idx.unsqueeze(1).expand(idx.shape[0], 2, 1)
        size = size_map.flatten(2).gather(dim=2, index=idx)
        offset = offset_map.flatten(2).gather(dim=2, index=idx).squeeze(-1)
        bbox = torch.cat([(idx_x.to(torch.float) + offset[:, :1]) / self.feat_sz,
                          (idx_y.to(torch.float) + offset[:, 1:]) / self.feat_sz,
                          size.squeeze(-1)], dim=1)
        return (bbox, max_score) if return_score else bbox

    def forward(self, x, gt_score_map=None):
        self._check(x)
        score_map_ctr, size_map, offset_map = self.get_score_map(x)
        if gt_score_map is None:
            bbox = self.cal_bbox(score_map_ctr, size_map, offset_map)
        else:
            bbox = self.cal_bbox(gt_score_map.unsqueeze(1), size_map, offset_map)
        return score_map_ctr, bbox, size_map, offset_map


def _fold(seq_or_conv):
    """(weight, bias) of a Conv2d, or of Conv2d + BatchNorm (eval statistics) folded together."""
    if isinstance(seq_or_conv, nn.Conv2d):
        conv, bn = seq_or_conv, None
    else:
        conv, bn = seq_or_conv[0], seq_or_conv[1]
    # folded in float64, rounded once to the run dtype (a float64 head stays exact)
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if bn is None:
        return w, b
    eps = float(getattr(bn, "eps", 1e-5))
    scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + eps)
    return w * scale[:, None, None, None], (b - bn.running_mean.double()) * scale + bn.bias.double()


def _append_tensors(out: list, m: nn.Module, names: tuple) -> None:
    params, bufs = m._parameters, m._buffers
    for n in names:
        out.append(params[n] if n in params else bufs[n] if n in bufs else getattr(m, n))


class FusedCenterPredictor(CenterPredictor):
    """`CenterPredictor` with the folded, branch-merged inference path (module docstring)."""

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedCenterPredictor":
        """Share ``ref_module``'s convs and norms (any module with CenterPredictor's structure:
        ``conv{1..4}_{b}`` = Sequential(Conv2d, BatchNorm-like, ReLU), ``conv5_{b}`` = Conv2d)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k in ("feat_sz", "stride"):
            if not hasattr(ref_module, k):
                raise TypeError(f"{cls.__name__}.from_reference: `ref_module` lacks `{k}`")
            setattr(m, k, getattr(ref_module, k))
        m.img_sz = m.feat_sz * m.stride
        for b in _BRANCHES:
            for s in range(1, 6):
                name = f"conv{s}_{b}"
                sub = getattr(ref_module, name, None)
                ok = (isinstance(sub, nn.Conv2d) if s == 5 else
                      isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[0], nn.Conv2d)
                      and all(hasattr(sub[1], a) for a in ("weight", "bias", "running_mean", "running_var"))
                      and isinstance(sub[2], nn.ReLU))
                if not ok:
                    raise TypeError(f"{cls.__name__}.from_reference: `{name}` does not have the "
                                    "CenterPredictor structure")
                setattr(m, name, sub)
        m.train(ref_module.training)
        return m

    def uses_folded(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True

    def _folded_weights(self, dtype):
        """`_fold_all`'s stages for ``dtype``: a `Derived` cache per dtype,
        over every parameter and floating buffer (rebuilt when any changes; `fasttrack.nn.derived`)."""
        caches = self.__dict__.setdefault("_fold", {})
        cache = caches.get(dtype)
        if cache is None:
            cache = caches[dtype] = Derived()
        return cache.get(self._fold_sources(), lambda: self._fold_all(dtype))

    def _fold_sources(self) -> tuple:
        """Every tensor `_fold` reads, in stage order, read from the modules' parameter / buffer
        dicts (walking ``parameters()`` and ``buffers()`` took ~100 µs a call, attribute reads ~65)."""
        out = []
        mods = self._modules
        for s in range(1, 6):
            for b in _FUSED_BRANCHES:
                m = mods[f"conv{s}_{b}"]
                if isinstance(m, nn.Conv2d):
                    _append_tensors(out, m, ("weight", "bias"))
                else:
                    conv, bn = tuple(m._modules.values())[:2]   # = m[0], m[1]
                    _append_tensors(out, conv, ("weight", "bias"))
                    _append_tensors(out, bn, ("weight", "bias", "running_mean", "running_var"))
        return tuple(out)

    def _fold_all(self, dtype):
        """``[(weight, bias, groups, padding, oneDNN-packed weight or None)]`` per stage."""
        stages = []
        for s in range(1, 6):
            wb = [_fold(getattr(self, f"conv{s}_{b}")) for b in _FUSED_BRANCHES]
            if s == 5:  # pad the 1-channel centre output to 2 so the three groups are equal
                (wc, bc) = wb[0]
                wb[0] = (torch.cat([wc, torch.zeros_like(wc)]), torch.cat([bc, torch.zeros_like(bc)]))
            w = torch.cat([w for w, _ in wb]).to(dtype).contiguous(memory_format=torch.channels_last)
            b = torch.cat([b for _, b in wb]).to(dtype)
            groups = 1 if s == 1 else 3
            pad = list(getattr(self, f"conv{s}_ctr")[0].padding) if s < 5 else [0, 0]
            packed = None
            if packable(w, w, None):   # packed for a B=1 map; oneDNN serves any batch with it
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    w, pad, [1, 1], [1, 1], groups, [1, w.shape[1] * groups, self.feat_sz, self.feat_sz])
            stages.append((w, b, groups, pad, packed))
        return stages

    def _folded_maps(self, x):
        """The three branches as one network: ``[B, 6, H, W]`` (channels-last memory), channels
        ``[sigmoid(ctr), -, sigmoid(size) x2, offset x2]``, the sigmoids clamped as the official head."""
        h = x.contiguous(memory_format=torch.channels_last)
        stages = self._folded_weights(x.dtype)
        for i, (w, b, groups, pad, packed) in enumerate(stages):
            if packed is not None and packable(h, w, b):
                h = torch.ops.mkldnn._convolution_pointwise(h, packed, b, pad, [1, 1], [1, 1], groups, "none", [], "")
            else:
                h = F.conv2d(h, w, b, padding=pad, groups=groups)
            if i < 4:
                # torch's ReLU, not oneDNN's post-op: that one maps NaN to 0, and NaN features (a
                # diverging tracker) must give the NaN boxes the reference gives, not a plausible one
                h = F.relu_(h)
        h[:, :4].sigmoid_().clamp_(min=1e-4, max=1 - 1e-4)
        return h

    def get_score_map(self, x):
        if not self.uses_folded(x):
            return super().get_score_map(x)
        h = self._folded_maps(x)
        return h[:, 0:1].contiguous(), h[:, 2:4].contiguous(), h[:, 4:6].contiguous()

    def forward(self, x, gt_score_map=None):
        if gt_score_map is not None or not self.uses_folded(x):
            return super().forward(x, gt_score_map)
        self._check(x)
        h = self._folded_maps(x)
        score_map_ctr, size_map, offset_map = h[:, 0:1].contiguous(), h[:, 2:4].contiguous(), h[:, 4:6].contiguous()
        # `cal_bbox` in fewer ops, reading size and offset at the peak from one row of h; the same
        # values in the same arithmetic as the reference
        B, f = x.shape[0], self.feat_sz
        _, idx = torch.max(score_map_ctr.flatten(1), dim=1, keepdim=True)
        row = h.permute(0, 2, 3, 1).reshape(B, f * f, 6).gather(1, idx[:, :, None].expand(B, 1, 6)).squeeze(1)
        xy = torch.cat([idx % f, torch.div(idx, f, rounding_mode="floor")], dim=1).to(torch.float)
        bbox = torch.cat([(xy + row[:, 4:6]) / f, row[:, 2:4]], dim=1)
        return score_map_ctr, bbox, size_map, offset_map


# patch_model (fasttrack.nn._recognizers): OSTrack's CENTER head and its copies (CompressTracker, AVTrack)
def match_center_head(m) -> bool:
    return (has_attrs(m, "feat_sz", "stride")
            and all(hasattr(m, f"conv{s}_{b}") for s in range(1, 6) for b in _BRANCHES))


def probe_center_head(m):
    return (probe_like(m, 2, m.conv1_ctr[0].in_channels, m.feat_sz, m.feat_sz),), {}


register_recognizer("ostrack.center_head", match_center_head, FusedCenterPredictor.from_reference,
                    probe=probe_center_head)
