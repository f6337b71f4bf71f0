import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fasttrack  # noqa: E402,F401

torch.manual_seed(0)


def pytest_configure(config):
    # `--benchmark-disable` (CI) runs every benchmark once as a smoke test: see harness.compile_fn
    if config.getoption("benchmark_disable", default=False):
        os.environ["FASTTRACK_BENCH_SMOKE"] = "1"
