"""Which kernel family serves an op call: `FASTTRACK_BACKEND=auto|native|triton|reference`.

- ``auto`` (default) / ``native``: the op's registered dispatcher kernel for the tensor's device —
  C++ on CPU; Triton (or CUDA C++ for gather/scatter) on CUDA.
- ``triton``: the Triton kernels. On CUDA tensors that is what ``auto`` runs anyway; on CPU tensors
  they run under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the test-suite checks
  the GPU kernel source on a machine without a GPU. This is an eager verification mode: it is not
  traced by ``torch.compile``.
- ``reference``: the pure-PyTorch spec in `fasttrack.reference` (autograd by PyTorch).

Use the environment variable (read when fasttrack is imported), or
``with fasttrack.use_backend("reference"): ...`` at run time.

Graph capture and export (`capturing_graph`, `exporting_to_onnx`): while Python code is being
traced into a graph, the fused modules take their traceable path, and while an ONNX exporter runs,
every op call runs its reference decomposition (plain aten ops that both exporters translate), so
``torch.onnx.export`` works on reference and fused modules with either exporter.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "native", "triton", "reference")
_state = threading.local()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"FASTTRACK_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


# Read once: this is on every op call's path (os.environ lookups cost ~1 µs). Switch at run time
# with `use_backend`.
_ENV_BACKEND = os.environ.get("FASTTRACK_BACKEND", "auto") or "auto"


# How many `use_backend` blocks are open in any thread: while none is, the thread-local lookup
# (~0.4 µs) is skipped.
_overrides = 0
_overrides_lock = threading.Lock()


def current_backend() -> str:
    name = getattr(_state, "name", None) if _overrides else None
    if name is None:
        name = _ENV_BACKEND if _ENV_BACKEND in BACKENDS else _validate(_ENV_BACKEND)
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed op calls (this thread) on backend `name`."""
    global _overrides
    prev = getattr(_state, "name", None)
    _state.name = _validate(name)
    with _overrides_lock:
        _overrides += 1
    try:
        yield
    finally:
        _state.name = prev
        with _overrides_lock:
            _overrides -= 1


# ------------------------------------------------------------------------------------------------
# Value checks on GPU tensors
# ------------------------------------------------------------------------------------------------
# Reading a value back from a CUDA tensor stalls the host until the GPU has caught up, and makes a
# call impossible to capture in a CUDA graph. So on CUDA the value checks of the Triton launchers
# (index ranges, NaN scores) are device-side asserts (`torch._assert_async`: no host read; a
# failure surfaces as a CUDA error at the next synchronisation) and the kernels never read or write
# outside their tensors whatever the values. `FASTTRACK_SYNC_CHECKS=1` (or `sync_checks()`) checks
# on the host instead and raises the same ValueError as the CPU kernels (for debugging). CPU calls
# always check on the host: there it costs nothing. gather_tokens / pad_scatter keep their own
# per-call switch, ``check_index``.
_ENV_SYNC_CHECKS = os.environ.get("FASTTRACK_SYNC_CHECKS", "0") not in ("", "0")
_sync_overrides = 0


def sync_checks_enabled() -> bool:
    """Whether GPU value checks read back to the host in this thread (see `sync_checks`)."""
    if _sync_overrides:
        flag = getattr(_state, "sync_checks", None)
        if flag is not None:
            return flag
    return _ENV_SYNC_CHECKS


@contextlib.contextmanager
def sync_checks(enabled: bool = True):
    """Check op inputs' values on the host on GPU tensors too (one synchronisation per check), so a
    bad index or a NaN score raises the documented ValueError at the call instead of a device-side
    assert. This thread, inside the block."""
    global _sync_overrides
    prev = getattr(_state, "sync_checks", None)
    _state.sync_checks = bool(enabled)
    with _overrides_lock:
        _sync_overrides += 1
    try:
        yield
    finally:
        _state.sync_checks = prev
        with _overrides_lock:
            _sync_overrides -= 1


# ------------------------------------------------------------------------------------------------
# Graph capture and export
# ------------------------------------------------------------------------------------------------
_is_compiling = torch.compiler.is_compiling    # torch.compile and torch.export
_is_exporting = torch.compiler.is_exporting
_jit_tracing = torch._C._is_tracing            # torch.jit.trace, and the legacy ONNX exporter


def capturing_graph() -> bool:
    """Python code is being traced into a graph (torch.compile, torch.export, the ONNX exporters,
    torch.jit.trace). Then the fused modules take their traceable path: no host reads of tensor
    values, no oneDNN pre-packed weights, no cached tensors, no direct C++ calls (a tracer does not
    see them: a traced graph would hold their results as constants). ~70 ns."""
    return _is_compiling() or _jit_tracing()


def exporting_to_onnx() -> bool:
    """An ONNX exporter is tracing (``torch.onnx.export``, ``dynamo=True`` or not). Then every
    fasttrack op call runs its reference decomposition: aten ops with ONNX translations, stable
    sorts as ``TopK`` (which breaks ties by the lower index, the ops' rule). The public
    ``torch.onnx.is_in_onnx_export`` costs ~1 µs, so it is only asked while a graph is traced."""
    if _is_compiling():   # first: Dynamo cannot trace `_jit_tracing`
        return _is_exporting() and torch.onnx.is_in_onnx_export()
    return _jit_tracing() and torch.onnx.is_in_onnx_export()
