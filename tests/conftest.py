import os

# Where there is no CUDA device, `fasttrack.kernels` switches the Triton interpreter on before any
# kernel module is imported (the test-suite then runs the GPU kernel source on CPU tensors); with a
# device the kernels run compiled, on CUDA tensors (tests/helpers.py: the "cuda" kernel).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fasttrack  # noqa: E402,F401
import fasttrack.kernels  # noqa: E402,F401  (decides the interpreter before any test imports a kernel)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
