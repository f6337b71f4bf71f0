"""Shared test helpers: the kernels a test can run on this machine, and running a call on one.

A *kernel* names where an op call runs:
- ``"native"``: the C++ CPU kernel (the default dispatch on CPU tensors; needs ``fasttrack._C``);
- ``"triton"``: the Triton kernel under the interpreter on CPU tensors (machines without a CUDA
  device, where ``fasttrack.kernels`` switches the interpreter on);
- ``"cuda"``: the dispatcher on CUDA tensors — compiled Triton kernels, CUDA C++ for gather/scatter
  (machines with a CUDA device).
Tests build their inputs on the CPU, `call` moves them to the kernel's device and the outputs back,
so the same assertions compare every kernel with `fasttrack.reference` on the CPU. Autograd flows
through the moves, so backward tests need no change either.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

import fasttrack
from fasttrack import _extension
from fasttrack.testing import cuda_device_present

CUDA = cuda_device_present()


def interpreter_on() -> bool:
    import fasttrack.kernels as k
    return k.INTERPRET


def kernels(triton: bool = True, native: bool = True, cuda: bool = True, cuda_cpp: bool = False) -> list[str]:
    """The kernels present here, in the order native, triton (interpreter), cuda. ``cuda_cpp``: the
    op's GPU kernel is CUDA C++, so "cuda" also needs `_C` built with CUDA."""
    out = []
    if native and _extension.loaded:
        out.append("native")
    if triton and interpreter_on():
        out.append("triton")
    if cuda and CUDA and (not cuda_cpp or _extension.cuda_built()):
        out.append("cuda")
    return out


def device_of(kernel: str) -> str:
    return "cuda" if kernel == "cuda" else "cpu"


def backend_of(kernel: str):
    """The backend context of `kernel` ("auto" for native and cuda: the dispatcher's kernel)."""
    return fasttrack.use_backend("triton" if kernel == "triton" else "auto")


def to_device(tree, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def call(kernel: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on `kernel`: tensors moved to its device (differentiably), outputs
    moved back to the CPU."""
    dev = device_of(kernel)
    args, kwargs = to_device((args, kwargs), dev)
    with backend_of(kernel):
        out = fn(*args, **kwargs)
    return to_device(out, "cpu")


def randomise(m: nn.Module, scale: float = 0.1) -> nn.Module:
    """Non-trivial norms, biases and layer scales (1-d parameters: their init plus noise of std
    ``scale``) and BatchNorm statistics, so a dropped bias, a swapped norm or an unfolded BN shows."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * scale)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, scale)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def count_kernel_calls(monkeypatch, name: str) -> list:
    """Record every direct call of op ``name``'s C++ CPU kernel (what the fused modules' dispatch
    rules promise to run) into the returned list."""
    from fasttrack.ops._registry import REGISTRY
    op = REGISTRY[name]
    calls = []
    kernel = op.cpu_kernel
    monkeypatch.setattr(op, "_cpu_kernel", lambda *a: calls.append(a) or kernel(*a))
    return calls


def assert_refused(name: str, wrapper, cases) -> None:
    """Every ``(args, exception type, message regex)`` of ``cases`` is refused, naming the
    argument, by the Python wrapper and by the raw ``torch.ops.fasttrack.<name>`` call alike."""
    import pytest
    op = getattr(torch.ops.fasttrack, name)
    for args, exc, msg in cases:
        with torch.no_grad():
            for fn in (wrapper, op):
                with pytest.raises(exc, match=rf"fasttrack\.{name}: {msg}"):
                    fn(*args)


def run_isolated(code: str, env: dict | None = None, timeout: int = 300):
    """Run ``code`` in a fresh interpreter (state read once per process: ISA caps, first calls) with
    ``env`` added to the environment; asserts it exits 0 and prints ``ok``."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, **(env or {})),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def run_capped(code: str, capability: str = "avx2", timeout: int = 300):
    """`run_isolated` with ``ATEN_CPU_CAPABILITY=capability`` (the kernels follow ATen's cap, read at
    load)."""
    run_isolated(code, {"ATEN_CPU_CAPABILITY": capability}, timeout)
