import os

# The Triton kernels run under the interpreter on CPU tensors; the flag must be set before any
# kernel module is imported (fasttrack.kernels would set it too on a machine without CUDA).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fasttrack  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
