"""The CMake build of csrc/ with its ctest C++ test, and the nvcc compile-only check of every .cu
(sm_80 + sm_90, no spills), so neither rots. They skip only when cmake / nvcc is absent, and not
even then under CI (CI=true), which has both: there a missing tool is a failure.

The CMake tree is kept in build/cmake (ninja rebuilds only what changed); a file lock keeps two
concurrent runs from sharing it. A cold CPU build takes a few minutes on 2 cores.
"""
from __future__ import annotations

import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cmake"
CU_SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))
CTEST_CASES = ("registry", "roundtrip_tokens", "roundtrip_nchw", "bad_index")  # CMakeLists.txt add_test

pytestmark = pytest.mark.build


def _find(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((f for f in fallbacks if os.access(f, os.X_OK)), None)


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    return _find("nvcc", *([f"{home}/bin/nvcc"] if home else []), "/usr/local/cuda/bin/nvcc")


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit directory (whose include/ holds cuda_runtime.h): CUDA_HOME, else the root the
    nvcc on PATH really runs from (it may be a wrapper script: `nvcc --dryrun` prints TOP=...)."""
    def ok(d):
        return d and os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))
    home = os.environ.get("CUDA_HOME")
    if ok(home):
        return os.path.realpath(home)
    nvcc = _find_nvcc()
    if nvcc:
        r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"], capture_output=True,
                           text=True)
        top = next((ln.split("TOP=", 1)[1].strip() for ln in (r.stdout + r.stderr).splitlines() if "TOP=" in ln), None)
        if ok(top):
            return os.path.realpath(top)
        up = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if ok(up):
            return up
    return "/usr/local/cuda" if ok("/usr/local/cuda") else None


def _torch_cuda_args() -> list[str]:
    """With a CUDA build of torch, LibTorch's CMake config looks for the CUDA toolkit: point it at the
    real one (the nvcc on PATH may be a wrapper it cannot use)."""
    import torch
    if torch.version.cuda is None:
        return []
    home = _cuda_toolkit()
    if home is None:
        pytest.skip("torch is a CUDA build, but no CUDA toolkit was found for its CMake config")
    if not os.path.isfile(os.path.join(home, "include", "cublas_v2.h")):
        # LibTorch's CUDA config links cuBLAS / NVRTC from the toolkit (compat runs against a CUDA torch
        # wheel on a machine whose toolkit has nvcc and the runtime only); CI builds against CPU torch
        pytest.skip(f"torch is a CUDA build and the toolkit at {home} lacks cuBLAS, which LibTorch's CMake "
                    "config needs")
    return [f"-DCUDAToolkit_ROOT={home}", f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc", f"-DCUDA_TOOLKIT_ROOT_DIR={home}"]


def _require(name: str, path: str | None) -> str:
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{name} not found: CI must have it")
        pytest.skip(f"{name} not found (PATH, CUDA_HOME, /usr/local/cuda)")
    return path


def _cmake() -> str:
    return _require("cmake", _find("cmake"))


def _nvcc() -> str:
    return _require("nvcc", _find_nvcc())


def _run(cmd, timeout=1800, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _ok(r: subprocess.CompletedProcess, what: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{out[-8000:]}"
    return out


@pytest.fixture(scope="module")
def cmake_tree():
    """Configured build/cmake (held under a lock for the module), with the nvcc check on if nvcc exists."""
    cmake, nvcc = _cmake(), _find_nvcc()
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD.parent / "cmake.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cmd = [cmake, "-S", ROOT, "-B", BUILD, f"-DPython3_EXECUTABLE={sys.executable}", *_torch_cuda_args(),
               *(["-DFASTTRACK_NVCC_CHECK=ON", f"-DFASTTRACK_NVCC={nvcc}"] if nvcc else ["-DFASTTRACK_NVCC_CHECK=OFF"])]
        if not (BUILD / "CMakeCache.txt").exists() and shutil.which("ninja"):
            cmd += ["-G", "Ninja"]  # the generator of an existing tree cannot change
        t = time.perf_counter()
        # a CUDA build of torch makes LibTorch's config detect the GPU's arch by running a program
        # (try_run), which fails where there is none: name the archs the kernels are built for
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")}
        _ok(_run(cmd, env=env), "cmake configure")
        print(f"\ncmake configure: {time.perf_counter() - t:.1f} s")
        yield cmake


def test_cmake_build_and_ctest(cmake_tree):
    t = time.perf_counter()
    _ok(_run([cmake_tree, "--build", BUILD, "--target", "fasttrack_cpp_test", "-j", os.environ.get("MAX_JOBS", "2")]),
        "cmake --build (fasttrack_ops + fasttrack_cpp_test)")
    print(f"cmake build: {time.perf_counter() - t:.1f} s")
    ctest = shutil.which("ctest") or str(pathlib.Path(cmake_tree).with_name("ctest"))
    out = _ok(_run([ctest, "--test-dir", BUILD, "--output-on-failure"], timeout=600), "ctest")
    assert f"0 tests failed out of {len(CTEST_CASES)}" in out, out
    for case in CTEST_CASES:
        assert re.search(rf"fasttrack\.{case} \.+\s+Passed", out), f"ctest case {case} did not pass:\n{out}"


def test_nvcc_compile_check(cmake_tree):
    _nvcc()
    assert CU_SOURCES, "no .cu file under csrc/: the CUDA kernels (csrc/cuda/*_kernel.cu) are missing"
    t = time.perf_counter()
    out = _ok(_run([cmake_tree, "--build", BUILD, "--target", "cuda_compile_check"]), "cuda_compile_check")
    print(f"cuda_compile_check: {time.perf_counter() - t:.1f} s\n{out}")
    # every .cu compiled for both archs without spills (the object is written only then)
    for cu in CU_SOURCES:
        rel = cu.relative_to(ROOT).as_posix()
        obj = BUILD / "nvcc_check" / (re.sub(r"[^A-Za-z0-9_]", "_", rel) + ".o")  # MAKE_C_IDENTIFIER
        assert obj.exists() and obj.stat().st_mtime >= cu.stat().st_mtime, f"{rel} was not compiled ({obj})"


CLEAN_KERNEL = """
__global__ void scatter_rows(const float* __restrict__ src, float* __restrict__ dst,
                             const long long* __restrict__ index, int k, int c) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < k * c) dst[index[i / c] * c + i % c] = src[i];
}
"""

# 96 live accumulators under __launch_bounds__(1024, 2) (32 registers a thread) must spill.
SPILLING_KERNEL = """
__global__ void __launch_bounds__(1024, 2) spill(const float* __restrict__ x, float* __restrict__ y, int n) {
  float acc[96];
#pragma unroll
  for (int j = 0; j < 96; ++j) acc[j] = x[j * n + threadIdx.x];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int j = 0; j < 96; ++j) acc[j] = acc[j] * acc[(j + 1) % 96] + x[it];
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 96; ++j) s += acc[j] * (j + 1);
  y[threadIdx.x] = s;
}
"""


@pytest.mark.parametrize("kernel,spills", [(CLEAN_KERNEL, False), (SPILLING_KERNEL, True)], ids=["clean", "spills"])
def test_nvcc_check_detects_spills(tmp_path, kernel, spills):
    """The per-file check that cuda_compile_check runs (CMakeLists.txt in script mode) fails on spills."""
    cmake, nvcc = _cmake(), _nvcc()
    src = tmp_path / "k.cu"
    src.write_text(kernel)
    r = _run([cmake, f"-DNVCC={nvcc}", f"-DSRC={src}", f"-DOUT={tmp_path / 'k.o'}",
              "-P", ROOT / "CMakeLists.txt"], timeout=600)
    out = r.stdout + r.stderr
    if spills:
        assert r.returncode != 0 and "register spills" in out, out
    else:
        assert r.returncode == 0 and "no spills" in out, out
