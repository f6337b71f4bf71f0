import os

import torch  # noqa: E402

import fasttrack  # noqa: E402,F401
import fasttrack.kernels  # noqa: E402,F401  (the interpreter only where there is no CUDA device)

torch.manual_seed(0)


def pytest_configure(config):
    # `--benchmark-disable` (CI) runs every benchmark once as a smoke test: see harness.compile_fn
    if config.getoption("benchmark_disable", default=False):
        os.environ["FASTTRACK_BENCH_SMOKE"] = "1"
