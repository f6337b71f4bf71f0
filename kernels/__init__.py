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


def _triton_version() -> tuple:
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


TRITON_VERSION = _triton_version()
# Register allocation changed between triton 3.6 and 3.7: a few tile configs that fit in registers
# with 3.7+ spill with 3.6 (`make aot` under each version). Launchers pick smaller tiles there.
TRITON_BEFORE_3_7 = TRITON_VERSION < (3, 7)


def _interpreter_compat() -> None:
    """triton < 3.7's interpreter turns a runtime loop bound into an int with ``int(array)`` of a
    shape-(1,) numpy array, which numpy >= 2.4 refuses: every kernel with a runtime-bounded
    ``range`` then fails under the interpreter. Apply triton 3.7's fix (``int(data.squeeze())``) to
    older versions. The compiled (GPU) path never runs this code."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if not TRITON_BEFORE_3_7 or original is None or getattr(original, "_fasttrack_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fasttrack_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _interpreter_compat()
