"""fasttrack's Triton kernels, installed as `fasttrack.kernels` (never as top-level `kernels`,
a name that belongs to another PyPI project).

On a machine without a CUDA device the kernels run under the Triton interpreter on CPU tensors:
this package turns `TRITON_INTERPRET=1` on before any kernel module is imported (the flag is read
when `@triton.jit` runs), unless the environment already set it.
"""
import os

if __name__ == "kernels":
    raise ImportError(
        "`kernels` is not an importable package: fasttrack's Triton kernels are `fasttrack.kernels` "
        "(the top-level name `kernels` belongs to another PyPI project)."
    )

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
