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
"""
from __future__ import annotations

import contextlib
import os
import threading

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
