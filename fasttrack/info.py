"""`python -m fasttrack.info`: versions, whether `fasttrack._C` loaded (and why not), CUDA / Triton
availability, and which kernel serves each op on each device under the current backend."""
from __future__ import annotations

import platform
import sys

import torch

import fasttrack
from fasttrack import _extension
from fasttrack.backend import current_backend
from fasttrack.ops._registry import REGISTRY, serving_kernel


def report() -> str:
    lines = [f"fasttrack {fasttrack.__version__}  (python {platform.python_version()}, {platform.machine()})",
             f"torch {torch.__version__}  (CUDA build: {torch.version.cuda}, CUDA available: "
             f"{torch.cuda.is_available()}, threads: {torch.get_num_threads()})"]
    try:
        import triton
        import fasttrack.kernels as k
        lines.append(f"triton {triton.__version__}  (interpreter on CPU tensors: {k.INTERPRET})")
    except Exception as e:  # triton is optional at import time
        lines.append(f"triton: not available ({type(e).__name__}: {e})")
    if _extension.loaded:
        lines.append(f"fasttrack._C: loaded (CUDA kernels built: {_extension.cuda_built()}; CPU kernels' vector ISA: "
                     f"{_extension._C.cpu_isa()}, capped by ATEN_CPU_CAPABILITY)")
        lines.append(f"large-output cache: {_extension.cached_bytes() >> 20} MiB free buffers held, limit "
                     f"{_extension._C.output_cache_limit() >> 20} MiB (FASTTRACK_CPU_CACHE_MB)")
    else:
        lines.append(f"fasttrack._C: NOT loaded — {_extension.load_error}")
    lines.append(f"backend: {current_backend()}  (FASTTRACK_BACKEND=auto|native|triton|reference)")
    lines.append("")
    lines.append(f"{'op':<16} {'CPU':<36} {'CUDA':<28} registered dispatch keys")
    for name in REGISTRY:
        keys = [k for k in ("CPU", "CUDA", "Meta", "Autograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttrack::{name}", k)]
        lines.append(f"{name:<16} {serving_kernel(name, 'cpu'):<36} {serving_kernel(name, 'cuda'):<28} "
                     f"{','.join(keys)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
