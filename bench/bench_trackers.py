"""Whole-tracker benchmarks (issue 8): every `fasttrack.zoo` family end to end, providers side by side.

Groups ``tracker/<family>/B<b>/<dtype>``, B = 1 (tracking latency) and 32 (throughput), fp32 and
bf16. Providers (``extra_info["provider"]``), measured in this one process on the same inputs:
- ``reference``: the family's plain-PyTorch reference modules (official semantics);
- ``fused``: fasttrack's fused modules (sharing the reference's parameters);
- ``compile``: ``torch.compile(reference, dynamic=False)`` (Inductor);
- ABTrack only: ``dense`` — the issue's yardstick, an un-pruned ViT-B of the same structure that
  never bypasses (``fused`` vs ``dense`` is the ≥2.5× target); at B=32 ``fused-all`` — the fused
  backbone running the bypassed block on all samples (``static`` mode; ``fused`` must beat it, as
  half the samples bypass). See `fasttrack.zoo` for how the gates are set.
- OSTrack-384 (optional config) is measured at B=1 only.
Every provider's output is checked against the reference output on the benchmarked inputs
(features within ``tolerance(dtype, scale=100)`` — a 12-block ViT compounds rounding per block —,
kept / removed indices and bypass decisions equal, boxes within the same tolerance); ``dense``
computes something else (un-pruned) and is checked for shape only. bf16 indices: candidate
elimination ranks near-tied scores, which bf16 rounding can reorder, so at bf16 ≥ 90% of the kept /
removed index sets must agree and the feature check is skipped when any index (or its order, which
sets the token layout) differs; the boxes are still compared.

On a CUDA device (``python -m bench --device cuda -k tracker``) the dtypes are fp32, fp16 and bf16,
every provider is timed with CUDA events (median, warm-up excluded) and also reports the CUDA kernels
one call launches (``extra_info["kernels"]``, torch.profiler), and two providers join:
- ``compile-ro``: ``torch.compile(reference, mode="reduce-overhead")`` (Inductor with CUDA graphs);
- ``fused-graph``: the fused network captured once and replayed (`fasttrack.graphed`).

Smoke rule (CI runs ``pytest bench --benchmark-disable``; this file must finish in ~6 minutes on 2
idle cores, and one Inductor compile of a 12-block ViT costs a minute or more per shape/dtype): when
benchmarking is disabled,
- B=32 cases run at batch 2 on the family's reduced variant (``zoo.build(..., depth=SMOKE_DEPTH)``:
  the batch > 1 code paths, ABTrack's half-batch bypass included, still run), and so does
  OSTrack-384; B=1 cases of the four families run the real configuration;
- ``compile`` cases run on the reduced variant with ``backend="aot_eager"``: Dynamo + AOTAutograd
  trace the reference (graph capture through the fasttrack ops' fake kernels is what can break),
  without Inductor's C++ code generation.
Timed runs (``python -m bench``) use the real batch, full depth and Inductor everywhere.
"""
from __future__ import annotations

import functools

import pytest
import torch

import fasttrack
from bench.harness import bench_device, cuda_kernel_count, cuda_median_ms
from fasttrack import zoo
from fasttrack.testing import tolerance

FAMILIES = ["ostrack", "utptrack-o", "etctrack", "abtrack", "compresstracker", "ostrack-384"]
SMOKE_DEPTH = 4   # CE at block 3 (OSTrack / UTPTrack-O), one gated block (ABTrack), one HIBlock (ETCTrack)
DEVICE = bench_device()
ON_CUDA = DEVICE.type == "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if ON_CUDA else {})


def _params():
    out = []
    for fam in FAMILIES:
        for B in ([1] if fam == "ostrack-384" else [1, 32]):
            for dt in DTYPES:
                provs = ["reference", "fused"] + (["fused-graph"] if ON_CUDA else [])
                if fam == "abtrack":
                    provs += ["dense"] + (["fused-all"] if B > 1 else [])
                provs.append("compile")  # last: in smoke mode it builds another (reduced) case
                if ON_CUDA:
                    provs.append("compile-ro")
                out += [pytest.param(fam, B, dt, p, id=f"{fam}-B{B}-{dt}-{p}") for p in provs]
    return out


@functools.lru_cache(maxsize=1)   # one case (two ViT-B networks) alive at a time
def _case(family, batch, dtype_name, depth):
    case = zoo.build(family, batch, DTYPES[dtype_name], depth=depth)
    if ON_CUDA:
        for m in (case.reference, case.fused, *case.extras.values()):
            m.to(DEVICE)
        case.inputs = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case.inputs)
    with torch.no_grad():
        expected = case.reference(*case.inputs)
    return case, expected


def _check(case, expected, out, dtype):
    res = case.parity(expected, out)
    atol, _ = tolerance(dtype, scale=100)
    agree = res["index_agreement"]
    need = 1.0 if dtype == torch.float32 else 0.9
    assert agree is None or agree >= need, f"kept/removed indices differ: agreement {agree:.4f} < {need}"
    if res["index_order_equal"] in (None, True):
        assert res["feature_max_abs"] <= atol, f"features differ: max abs {res['feature_max_abs']:.3g} > {atol:.3g}"
    if res["box_max_abs"] is not None:
        assert res["box_max_abs"] <= atol, f"boxes differ: max abs {res['box_max_abs']:.3g} > {atol:.3g}"
    return res


@pytest.mark.parametrize("family,B,dtype_name,provider", _params())
def test_tracker(benchmark, family, B, dtype_name, provider):
    smoke = benchmark.disabled
    dtype = DTYPES[dtype_name]
    batch = 2 if smoke and B > 1 else B
    depth = SMOKE_DEPTH if smoke and (provider == "compile" or B > 1 or family == "ostrack-384") else None
    case, expected = _case(family, batch, dtype_name, depth)
    benchmark.group = f"tracker/{family}/B{B}/{dtype_name}"
    benchmark.extra_info.update(provider=provider, batch=batch, depth=depth or "full", description=case.description)
    if provider == "compile":
        fn = torch.compile(case.reference, dynamic=False, backend="aot_eager" if smoke else "inductor")
    elif provider == "compile-ro":
        fn = torch.compile(case.reference, dynamic=False, mode="reduce-overhead")
    elif provider == "fused-graph":
        fn = fasttrack.graphed(case.fused)
    else:
        fn = {"reference": case.reference, "fused": case.fused, **case.extras}[provider]
    with torch.no_grad():
        out = fn(*case.inputs)   # also the warm-up: compiles, captures, packs the oneDNN weights
        if provider == "dense":
            assert case.features(out).shape == case.features(expected).shape
        elif provider != "reference":
            benchmark.extra_info.update(_check(case, expected, out, dtype))
        if ON_CUDA:
            benchmark.extra_info["do_bench_ms"] = cuda_median_ms(fn, *case.inputs)
            benchmark.extra_info["kernels"] = cuda_kernel_count(fn, *case.inputs)
            benchmark.pedantic(fn, args=case.inputs, rounds=1, iterations=1)   # the table reads do_bench_ms
        else:
            benchmark.pedantic(fn, args=case.inputs, rounds=5 if B == 1 else 2, iterations=1)
    if provider.startswith("compile"):
        torch._dynamo.reset()   # drop the compiled graphs with their case
