"""Loads the compiled extension `fasttrack._C` (schemas + native CPU/CUDA kernels).

If it is missing or fails to load, fasttrack still imports: the op registry defines the same
schemas from Python with `fasttrack.reference` as the CPU kernel, and a warning says so once.
`FASTTRACK_DISABLE_C=1` simulates a missing extension (tests use it).
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (the extension links against libtorch; load it first)

loaded: bool = False
load_error: str | None = None

if os.environ.get("FASTTRACK_DISABLE_C", "") not in ("", "0"):
    load_error = "disabled by FASTTRACK_DISABLE_C"
else:
    try:
        from fasttrack import _C  # noqa: F401  (registers the fasttrack:: ops on import)

        loaded = True
    except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
        load_error = f"{type(e).__name__}: {e}"

if not loaded:
    warnings.warn(
        f"fasttrack._C is not available ({load_error}); ops run the pure-PyTorch reference on CPU. "
        "Build it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_built() -> bool:
    """True when `_C` was compiled with its CUDA kernels."""
    return loaded and bool(torch.ops.fasttrack._cuda_built())


def empty_cache() -> int:
    """Free the buffers of CPU outputs (>= 256 KiB) that fasttrack keeps for reuse, as
    `torch.cuda.empty_cache` does for PyTorch's CUDA allocator; returns the bytes freed. At most
    ``FASTTRACK_CPU_CACHE_MB`` (default 512; 0 disables the cache) is kept. Why it exists:
    `csrc/include/fasttrack/output_cache.h`."""
    return int(_C.output_cache_clear()) if loaded else 0


def cached_bytes() -> int:
    """Bytes held in free cached output buffers (see `empty_cache`)."""
    return int(_C.output_cache_bytes()) if loaded else 0
