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
_C = None   # the extension module, once loaded

def _elf_problem(path: str) -> str | None:
    """Why the ELF shared object at `path` cannot be loaded safely, or None. A file cut short (an
    interrupted build or copy) is mapped by the loader past its end, and the first touch of the
    missing pages kills the process with SIGBUS: refuse it before dlopen sees it."""
    import struct
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return "not a 64-bit little-endian ELF file"
            phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
            if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
                return f"truncated ({size} bytes; its headers reach past the end)"
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
            for i in range(phnum):
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if p_type == 1 and p_offset + p_filesz > size:   # PT_LOAD
                    return f"truncated ({size} bytes; a loadable segment ends at {p_offset + p_filesz})"
    except OSError as e:
        return f"unreadable ({e})"
    return None


def _load() -> tuple[bool, str | None]:
    import importlib.util
    if os.environ.get("FASTTRACK_DISABLE_C", "") not in ("", "0"):
        return False, "disabled by FASTTRACK_DISABLE_C"
    try:
        spec = importlib.util.find_spec("fasttrack._C")
    except (ImportError, ValueError) as e:
        spec, why = None, f"{type(e).__name__}: {e}"
    else:
        why = None
    if spec is None or spec.origin is None:
        return False, why or ("the compiled extension is not built (no fasttrack/_C*.so next to the package)")
    problem = _elf_problem(spec.origin) if spec.origin.endswith(".so") else None
    if problem:
        return False, f"{spec.origin} is {problem}: rebuild it"
    try:
        from fasttrack import _C  # (registers the fasttrack:: ops on import)
    except Exception as e:  # an undefined symbol from a torch version mismatch, ...
        return False, f"{type(e).__name__}: {e}"
    globals()["_C"] = _C   # `_extension._C` (defined here, once loaded)
    return True, None


loaded, load_error = _load()

if not loaded:
    warnings.warn(
        f"fasttrack._C is not available ({load_error}); ops run the pure-PyTorch reference on CPU. "
        "Build it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_functions(*names: str):
    """`fasttrack._C.cpu` when the extension is loaded and has every function in ``names`` (an older
    build may lack one), else None: the direct C++ entry points of the fused modules' CPU paths."""
    cpu = getattr(_C, "cpu", None) if loaded else None
    return cpu if cpu is not None and all(hasattr(cpu, n) for n in names) else None


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
