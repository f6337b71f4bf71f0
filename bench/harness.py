"""The frame every op benchmark uses: one pytest-benchmark test per (op, shape, dtype, provider).

Providers, measured side by side in one process:
- ``reference``: the eager PyTorch spec (`fasttrack.reference`);
- ``compile``: ``torch.compile`` of the same reference function;
- ``native``: fasttrack's kernel for the device (C++ on CPU), through the public API;
- ``triton``: the Triton kernel on CUDA (skipped on CPU: the interpreter's timing means nothing).
Device (``python -m bench --device cuda``, env ``FASTTRACK_BENCH_DEVICE``): inputs are built on the
CPU and moved to the device; on CUDA every provider is timed with CUDA events
(`cuda_median_ms`: ``triton.testing.do_bench``, median, warm-up excluded) — pytest-benchmark's host
timer would measure launch time — and the result goes to ``extra_info["do_bench_ms"]``.
Groups are ``op/shape/dtype`` so `python -m bench` can put providers side by side. Each test records
the bytes the op must move and its FLOPs, for the roofline column, and checks the provider's output
against the reference on the benchmarked inputs.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

PROVIDERS = ("reference", "compile", "native", "triton")


def bench_device() -> torch.device:
    """The device benchmarks run on: ``FASTTRACK_BENCH_DEVICE`` (``python -m bench --device``), CPU
    by default."""
    return torch.device(os.environ.get("FASTTRACK_BENCH_DEVICE", "cpu") or "cpu")


def to_bench_device(tree):
    from torch.utils._pytree import tree_map
    dev = bench_device()
    return tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, tree)


def cuda_median_ms(fn, *args) -> float:
    """Median milliseconds of ``fn(*args)`` on the current CUDA stream, from CUDA events
    (``triton.testing.do_bench``: warm-up runs excluded, the L2 cache flushed between runs)."""
    import triton.testing
    return float(triton.testing.do_bench(lambda: fn(*args), return_mode="median"))


def cuda_kernel_count(fn, *args) -> int:
    """CUDA kernels one call of ``fn`` launches (torch.profiler; graph replays count their nodes)."""
    from torch.profiler import ProfilerActivity, profile
    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def smoke_run() -> bool:
    """True under ``pytest --benchmark-disable`` (how CI runs every benchmark once, untimed)."""
    return os.environ.get("FASTTRACK_BENCH_SMOKE") == "1"


# The compile provider compiles one reference function per op for every case (shape, dtype, layout;
# dynamic=False): more recompiles of one code object than Dynamo's default limit of 8, past which it
# silently runs the function eagerly, and "compile" would be timed as eager. Raise the limit, and
# make hitting it an error rather than a wrong number.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.fail_on_recompile_limit_hit = True


def compile_fn(fn, **kw):
    """`torch.compile` for the ``compile`` provider. In a smoke run (CI: every benchmark once, timing
    disabled) it traces with Dynamo but skips Inductor's code generation (``backend="eager"``):
    the benchmark's wiring and parity check still run, without minutes of C++ compilation that
    measure nothing there."""
    if smoke_run():
        kw = {**kw, "backend": "eager"}
        kw.pop("mode", None)
        kw.pop("options", None)
    return torch.compile(fn, **kw)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return compile_fn(fn, dynamic=False)


def _first_tensors(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def check_outputs(actual, expected, atol, rtol):
    """Compare every output; integer outputs (indices) must be equal."""
    for a, e in zip(_first_tensors(actual), _first_tensors(expected)):
        if e.is_floating_point():
            torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)
        else:
            assert torch.equal(a, e), "index outputs differ from the reference"


def bench_op(benchmark, provider, *, ref, native, args, group, nbytes=0, flops=0, atol=1e-4, rtol=1e-4,
             compare=check_outputs):
    """Benchmark one provider on `args`.

    ref: the reference callable; native: the fasttrack callable (same arguments); nbytes/flops: what
    the op must read+write / compute (for the roofline); compare(actual, expected, atol, rtol) checks
    parity on the benchmarked inputs.
    """
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, nbytes=int(nbytes), flops=int(flops))
    args = to_bench_device(args)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if provider == "triton":
        if device.type != "cuda":
            pytest.skip("triton provider needs a CUDA device (interpreter timings are meaningless)")
        from fasttrack.backend import use_backend

        def fn(*a):
            with use_backend("triton"):
                return native(*a)
    else:
        fn = {"reference": ref, "compile": _compiled(ref), "native": native}[provider]
    with torch.no_grad():
        expected = ref(*args)
        compare(fn(*args), expected, atol, rtol)
        if device.type == "cuda":
            benchmark.extra_info["do_bench_ms"] = cuda_median_ms(fn, *args)
            benchmark.pedantic(fn, args=args, rounds=1, iterations=1)   # the table reads do_bench_ms
        else:
            benchmark(fn, *args)
