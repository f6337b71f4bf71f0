#!/usr/bin/env bash
# The CUDA build path, proven without a GPU: a second venv with the CUDA build of torch, a
# non-editable `FORCE_CUDA=1 pip install --no-build-isolation .`, then, from outside the repo,
# `import fasttrack` and assert that every registered op has a CUDA kernel (C++ for the ops the
# registry marks cuda_cpp, the Python-registered Triton launcher for the rest) and that _C says it
# was built with CUDA. Needs only python3 (with venv), pip, a C++ compiler and nvcc.
#
# Re-runs are cheap: the venv is kept while the dependency list is unchanged (stamp file), and the
# sources are mirrored into <venv>/src rewriting only changed files, so ninja recompiles only those.
# The build runs on that mirror, never in the repo: the repo's build/ belongs to the CPU dev build,
# and other people may be rebuilding it concurrently.
#
# Environment: PYTHON (python3), CUDA_VENV (<repo>/.venv-cuda), CUDA_TORCH_SPEC (torch==2.14.1),
# CUDA_HOME (else found from nvcc), TORCH_CUDA_ARCH_LIST (setup.py default 8.0;9.0), MAX_JOBS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
# No triton pin: the CUDA torch wheel pins its own (torch 2.14.1 -> triton 3.8.0), and a different
# one cannot be co-installed.
DEPS="$TORCH_SPEC ninja pybind11 numpy setuptools wheel"
export MAX_JOBS="${MAX_JOBS:-2}"

say() { printf '[check-cuda-build] %s\n' "$*"; }
die() { printf '[check-cuda-build] FAILED: %s\n' "$*" >&2; exit 1; }

# --- the CUDA toolkit ------------------------------------------------------------------------------
# shellcheck source=scripts/cuda_env.sh
. "$ROOT/scripts/cuda_env.sh"
command -v "${CXX:-c++}" >/dev/null || die "no C++ compiler (${CXX:-c++}) on PATH"
CUDA_HOME="$(find_cuda_home)" || die "no CUDA toolkit (see above)"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

# --- the venv -------------------------------------------------------------------------------------
STAMP="$VENV/.fasttrack-deps"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ]; then
  say "creating $VENV with $DEPS"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $DEPS || die "pip install $DEPS failed"
  echo "$DEPS" > "$STAMP"
else
  say "reusing $VENV"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"   # torch.utils.cpp_extension runs `ninja` from PATH

TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
[ -n "$TORCH_CUDA" ] || die "$TORCH_SPEC in $VENV is not a CUDA build of torch"
NVCC_MAJOR="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
[ "${TORCH_CUDA%%.*}" = "$NVCC_MAJOR" ] || die "torch is built for CUDA $TORCH_CUDA but nvcc is CUDA $NVCC_MAJOR"
# torch's own CUDA headers (cusparse.h, ...) come from its nvidia-* wheels, not from the toolkit.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NV_INCLUDE="$SITE/nvidia/cu${NVCC_MAJOR}/include"
[ -d "$NV_INCLUDE" ] || die "$NV_INCLUDE is missing (torch's nvidia-* CUDA header wheels)"
export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"

# --- mirror the sources, then a non-editable install from the mirror -----------------------------
SRC="$VENV/src"
"$PY" "$ROOT/scripts/mirror_tree.py" "$ROOT" "$SRC" setup.py pyproject.toml README.md csrc fasttrack kernels
say "building (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}, MAX_JOBS=$MAX_JOBS)"
LOG="$VENV/build.log"
if ! (cd "$SRC" && FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps . >"$LOG" 2>&1); then
  tail -n 60 "$LOG" >&2
  die "FORCE_CUDA=1 pip install failed (full log: $LOG)"
fi
# (setup.py runs twice under pip: print its configuration once)
grep -E "fasttrack build configuration|^ +torch .*with_cuda|^ +sources:" "$LOG" | awk '!seen[$0]++' || true

# --- import from outside the repo and check the CUDA registrations --------------------------------
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PY" - "$SITE" <<'EOF'
import os, sys, warnings
site = os.path.realpath(sys.argv[1])
warnings.simplefilter("ignore")  # "no NVIDIA driver" etc.: expected on a machine without a GPU
import torch
import fasttrack
from fasttrack import _extension
from fasttrack.ops import REGISTRY

where = os.path.realpath(fasttrack.__file__)
assert where.startswith(site + os.sep), f"imported {where}, not the fasttrack installed in {site}"
assert _extension.loaded, f"fasttrack._C did not load: {_extension.load_error}"
assert torch.ops.fasttrack._cuda_built(), "fasttrack._C reports it was built without CUDA"
assert REGISTRY, "no fasttrack op registered"
failures = []
for name, op in sorted(REGISTRY.items()):
    qual = f"fasttrack::{name}"
    if op.cuda is None:  # a CPU-only internal op: it must not claim a CUDA kernel
        if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"):
            failures.append(f"{qual}: CPU-only op (OpDef.cuda=None) has a CUDA kernel registered")
        else:
            print(f"  {qual:<28} CPU only")
        continue
    want = "CUDA C++ (_C)" if op.cuda_cpp else f"Triton launcher {op.triton}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"):
        failures.append(f"{qual}: no CUDA kernel registered (expected {want})")
        continue
    # the dump names the file that registered each kernel: csrc/ for C++, a .py for Python
    line = next((l for l in torch._C._dispatch_dump(qual).splitlines() if l.startswith("CUDA:")), "")
    source = line.partition("registered at ")[2].split(":")[0]
    from_cpp = source.endswith((".cpp", ".cu"))
    if from_cpp != op.cuda_cpp:
        failures.append(f"{qual}: CUDA kernel is not the {want}: {line.strip()}")
        continue
    if not op.cuda_cpp:
        try:  # the launcher module must import (its kernels compile lazily, on a GPU)
            op.triton_launcher()
        except Exception as e:
            failures.append(f"{qual}: Triton launcher {op.triton} does not import: {type(e).__name__}: {e}")
            continue
    print(f"  {qual:<28} CUDA: {want}")
print(f"  fasttrack {where}; torch {torch.__version__} (CUDA {torch.version.cuda}); _cuda_built()=True")
if failures:
    print("\n".join("  MISSING " + f for f in failures), file=sys.stderr)
    sys.exit(1)
EOF
say "OK: every fasttrack op has its CUDA kernel"
