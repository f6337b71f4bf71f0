"""ONNX export of reference and fused networks, with either exporter, and the `bench peers` smoke run.

Every fasttrack op exports as its reference decomposition while an ONNX exporter traces
(`fasttrack.backend.exporting_to_onnx`); the fused modules take their traceable path while any graph
is captured (`capturing_graph`). Each family's depth-reduced network (CE / DTE / STE, a bypass gate,
token merging, a student block all present) is exported under ``torch.no_grad()`` — where a direct
C++ call would once have been baked into the graph as a constant — and run by ONNX Runtime on
inputs other than the export's, against the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import pytest
import torch
from torch.utils._pytree import tree_leaves

from fasttrack import zoo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DEPTH = 4   # CE at block 3 (OSTrack, UTPTrack-O), one gated block (ABTrack), one HIBlock (ETCTrack)
FAMILIES = ["ostrack", "utptrack-o", "compresstracker", "abtrack", "etctrack"]


@contextlib.contextmanager
def _quiet():
    buf = io.StringIO()
    level = logging.root.manager.disable
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    c = zoo.build(request.param, 1, torch.float32, depth=DEPTH)
    g = torch.Generator().manual_seed(99)
    fresh = tuple(torch.randn(t.shape, generator=g) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in c.inputs)
    with torch.no_grad():
        expected = c.reference(*fresh)
    return c, fresh, expected


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("which", ["reference", "fused"])
def test_onnx_export_runs_in_onnxruntime(case, which, dynamo, tmp_path):
    c, fresh, expected = case
    path = str(tmp_path / "net.onnx")
    with _quiet(), torch.no_grad():
        torch.onnx.export(getattr(c, which), c.inputs, path, dynamo=dynamo)
    graph = onnx.load(path).graph
    n_tensor_inputs = sum(isinstance(t, torch.Tensor) for t in c.inputs)
    assert len(graph.input) == n_tensor_inputs, "the exported graph lost its inputs (a constant graph)"
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, "custom-domain nodes: ONNX Runtime cannot run them"
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), [t for t in fresh if isinstance(t, torch.Tensor)])}
    outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if which == "fused":
        # the fused network returns no attention maps (the reference's `attn`); compare by position
        # in the output structure instead
        with torch.no_grad():
            got = c.fused(*fresh)
        want_fused = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
        assert len(outs) == len(want_fused)
        res = c.parity(expected, got)
        assert res["feature_max_abs"] <= 1e-4 and res["index_agreement"] in (None, 1.0)
        want = want_fused
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        assert o.shape == w.shape and o.dtype == w.dtype
        if w.is_floating_point():
            torch.testing.assert_close(o, w, atol=1e-4, rtol=1e-4)
        else:
            assert torch.equal(o, w), "kept / removed indices or decisions differ"


def test_export_with_a_bool_template_mask_is_refused():
    c = zoo.build("ostrack", 1, torch.float32, depth=DEPTH)
    z, x, _ = c.inputs
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 27] = True
    with _quiet(), torch.no_grad(), pytest.raises(Exception, match="bool `ce_template_mask`"):
        torch.onnx.export(c.fused, (z, x, mask), "/dev/null", dynamo=True)


def test_bench_peers_smoke():
    """`python -m bench peers --smoke`: export + ONNX Runtime and OpenVINO parity on every family
    (depth-reduced; OpenVINO's known mismatch is listed in bench/peers.py and must still occur)."""
    pytest.importorskip("openvino")
    from bench.peers import main
    assert main(["--smoke", "--families", ",".join(FAMILIES)]) == 0
