"""Builds fasttrack and its extension `fasttrack._C` (torch.utils.cpp_extension + ninja).

- CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) always.
- CUDA sources (csrc/cuda/*) only when a CUDA build of torch and a CUDA toolkit are both present, or
  FORCE_CUDA=1. Building never needs a GPU. Arch list: TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
- MAX_JOBS caps parallel compile jobs (ninja).
- FASTTRACK_SANITIZE=address builds the C++ kernels under AddressSanitizer (`make asan-test`).
- `kernels/` installs as `fasttrack.kernels`, never as a top-level `kernels` package.
Dev install: `pip install --no-build-isolation -e .`
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    # The `nvcc` first on PATH may be a wrapper script, so torch's guess from it can be wrong:
    # prefer CUDA_HOME, then the toolkit directory that really holds cuda_runtime.h.
    for cand in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return os.path.realpath(cand)
    return None


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and _cuda_home() is not None


with_cuda = _want_cuda()
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 since torch 2.14,
# whose headers no longer compile as C++17).
cxx_flags = ["-O3", "-fopenmp"]
link_flags = ["-fopenmp"]
define_macros = []
ext_kwargs = {}
# FASTTRACK_SANITIZE=address: the C++ kernels under AddressSanitizer (`make asan-test`; the process
# must preload libasan, as scripts/asan_test.sh does)
if os.environ.get("FASTTRACK_SANITIZE") == "address":
    cxx_flags = ["-O1", "-g", "-fopenmp", "-fsanitize=address", "-fno-omit-frame-pointer"]
    link_flags += ["-fsanitize=address"]
if with_cuda:
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to the directory whose "
                           "include/ holds cuda_runtime.h")
    if torch.version.cuda is None:
        raise RuntimeError(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a CUDA "
                           "build of torch (see `make check-cuda-build`)")
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("FASTTRACK_WITH_CUDA", None))
    Extension = cpp_extension.CUDAExtension
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]}
else:
    Extension = cpp_extension.CppExtension
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}

print("fasttrack build configuration:")
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), with_cuda={with_cuda}, "
      f"CUDA_HOME={_cuda_home() if with_cuda else '-'}, "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'}, "
      f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, ninja={shutil.which('ninja') is not None}")
print(f"  sources: {' '.join(sources)}")

setup(
    name="fasttrack",
    version="0.1.0",
    description="Fused GPU/CPU kernels for transformer visual object trackers",
    packages=["fasttrack", "fasttrack.ops", "fasttrack.nn", "fasttrack.nn.utptrack", "fasttrack.kernels"],
    package_dir={"fasttrack": "fasttrack", "fasttrack.kernels": "kernels"},
    python_requires=">=3.10",
    # the supported range, tested with `make compat` (README, "Supported versions")
    install_requires=["torch>=2.11,<2.16", "triton>=3.6,<3.10", "numpy"],
    # `python -m bench peers` and ONNX export tests: the CPU runtimes fasttrack is measured against
    extras_require={"peers": ["onnx>=1.20", "onnxscript>=0.5", "onnxruntime>=1.20", "openvino>=2025.0"]},
    ext_modules=[Extension(
        "fasttrack._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define_macros,
        extra_link_args=link_flags,
        **ext_kwargs,
    )],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
