"""Which kernel family serves an op call: `FASTTRACK_BACKEND=auto|native|triton|reference`.

- ``auto`` (default) / ``native``: the op's registered dispatcher kernel for the tensor's device —
  C++ on CPU; Triton (or CUDA C++ for gather/scatter) on CUDA.
- ``triton``: the Triton kernels. On CUDA tensors that is what ``auto`` runs anyway; on CPU tensors
  they run under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the test-suite checks
  the GPU kernel source on a machine without a GPU. This is an eager verification mode: it is not
  traced by ``torch.compile``.
- ``reference``: the pure-PyTorch spec in `fasttrack.reference` (autograd by PyTorch).

Use the environment variable, or ``with fasttrack.use_backend("reference"): ...``.
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


def current_backend() -> str:
    name = getattr(_state, "name", None)
    if name is None:
        name = _validate(os.environ.get("FASTTRACK_BACKEND", "auto") or "auto")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed op calls (this thread) on backend `name`."""
    prev = getattr(_state, "name", None)
    _state.name = _validate(name)
    try:
        yield
    finally:
        _state.name = prev
