import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fasttrack  # noqa: E402,F401

torch.manual_seed(0)
