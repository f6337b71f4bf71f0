"""Template caching `track()` (opt-in, inference): over a sequence of frames, reusing the cached
template work gives exactly the outputs of the full forward with the same template and search."""
import pytest
import torch

import fasttrack
from fasttrack.nn.etctrack import ETCTrackEncoder, FusedETCTrackEncoder
from fasttrack.nn.ostrack import FusedOSTrack, build_ostrack, ctr_point_mask
from fasttrack.nn.utptrack import FusedUTPTrackO, build_utptrack_o


def _same(a, b):
    if isinstance(a, dict):
        for k in ("pred_boxes", "score_map", "backbone_feat"):
            assert torch.equal(a[k], b[k]), k
        for key in ("removed_indexes_s", "kept_indexes"):
            for x, y in zip(a.get(key, []), b.get(key, [])):
                assert torch.equal(x, y), key
    else:
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_ostrack_track_equals_forward(fused):
    torch.manual_seed(0)
    net = build_ostrack(depth=4).eval()   # CE at block 3
    net = FusedOSTrack.from_reference(net).eval() if fused else net
    z1, z2 = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 128, 128)
    frames = [torch.randn(2, 3, 256, 256) for _ in range(3)]
    m = ctr_point_mask(2, 8)
    with torch.no_grad():
        _same(net.track(frames[0], template=z1, ce_template_mask=m), net(z1, frames[0], ce_template_mask=m))
        _same(net.track(frames[1], ce_template_mask=m), net(z1, frames[1], ce_template_mask=m))  # cached
        _same(net.track(frames[2], template=z2, ce_template_mask=m), net(z2, frames[2], ce_template_mask=m))


def test_ostrack_track_errors():
    net = build_ostrack(depth=1).eval()
    with pytest.raises(ValueError, match="template"):
        net.track(torch.randn(1, 3, 256, 256))
    net.track(torch.randn(1, 3, 256, 256), template=torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="`search` has batch 2"):
        net.track(torch.randn(2, 3, 256, 256))
    with pytest.raises(ValueError, match="`z`"):
        net.track(torch.randn(1, 3, 256, 256), template=torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_utptrack_o_track_equals_forward(fused):
    torch.manual_seed(0)
    net = build_utptrack_o(depth=5).eval()   # CE at 3, DTE / STE at 4
    net = FusedUTPTrackO.from_reference(net).eval() if fused else net
    z, dz1, dz2 = (torch.randn(1, 3, 128, 128) for _ in range(3))
    frames = [torch.randn(1, 3, 256, 256) for _ in range(3)]
    m = ctr_point_mask(1, 8)
    with fasttrack.use_backend("auto"), torch.no_grad():
        _same(net.track(frames[0], z, dz1, m), net(z, dz1, frames[0], m))
        _same(net.track(frames[1], ce_template_mask=m), net(z, dz1, frames[1], m))
        _same(net.track(frames[2], dynamic_template=dz2, ce_template_mask=m), net(z, dz2, frames[2], m))
    with pytest.raises(ValueError, match="`dynamic_template`"):
        net.track(frames[0], dynamic_template=torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_etctrack_track_equals_forward(fused):
    torch.manual_seed(0)
    enc = ETCTrackEncoder(dim=192, num_heads=3, num_stages=2, stage_depth=1, keep_ratio=0.7).eval()
    enc = FusedETCTrackEncoder.from_reference(enc).eval() if fused else enc
    z1, z2 = torch.randn(2, 5, 64, 192), torch.randn(2, 5, 64, 192)
    xs = [torch.randn(2, 256, 192) for _ in range(3)]
    with torch.no_grad():
        _same(enc.track(xs[0], z1), enc(z1, xs[0]))
        _same(enc.track(xs[1]), enc(z1, xs[1]))
        _same(enc.track(xs[2], z2), enc(z2, xs[2]))
    fresh = ETCTrackEncoder(dim=192, num_heads=3, num_stages=1, stage_depth=1)
    with pytest.raises(ValueError, match="`z`"):
        fresh.track(xs[0])
