#!/usr/bin/env bash
# `make compat TORCH=2.11.0 TRITON=3.6.0 [NUMPY=...] [ARGS="pytest args"]`: fasttrack built and tested
# against another torch / triton. A venv per (torch, triton, numpy) is kept at .venv-compat-<...>
# (re-created when the pins change); the working tree is mirrored into <venv>/src (tracked and
# untracked-but-not-ignored files, only changed files rewritten, so rebuilds are incremental), built
# there in place (`pip install --no-build-isolation --no-deps -e .`: CUDA sources too when that torch
# is a CUDA build and a toolkit is found), and the suite runs there (`pytest --benchmark-disable`).
# Not part of CI: the torch wheels are gigabytes. The supported range is in README and setup.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:?set TORCH, e.g. TORCH=2.11.0}"
TRITON="${TRITON:?set TRITON, e.g. TRITON=3.6.0}"
NUMPY="${NUMPY:-}"
VENV="${COMPAT_VENV:-$ROOT/.venv-compat-torch$TORCH-triton$TRITON${NUMPY:+-numpy$NUMPY}}"
DEPS="torch==$TORCH triton==$TRITON ${NUMPY:+numpy==$NUMPY }ninja pybind11 numpy pytest pytest-benchmark expecttest"
DEPS="$DEPS matplotlib hypothesis setuptools wheel"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
say() { printf '[compat] %s\n' "$*"; }

STAMP="$VENV/.fasttrack-deps"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ]; then
  say "creating $VENV: $DEPS"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  if ! "$VENV/bin/python" -m pip install -q $DEPS; then
    # a machine-wide pip configuration may cap torch below the version asked for: try without it
    say "retrying without the machine's pip configuration (PIP_CONFIG_FILE=/dev/null)"
    PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install -q $DEPS
  fi
  echo "$DEPS" >"$STAMP"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
"$PY" -c 'import torch, triton, numpy, sys; print(f"[compat] python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'

if [ -n "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" ]; then
  # shellcheck source=scripts/cuda_env.sh
  . "$ROOT/scripts/cuda_env.sh"
  if CUDA_HOME="$(find_cuda_home 2>/dev/null)"; then
    export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    MAJOR="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    [ -d "$SITE/nvidia/cu$MAJOR/include" ] && export CPATH="$SITE/nvidia/cu$MAJOR/include${CPATH:+:$CPATH}"
    say "CUDA build of torch and a toolkit ($CUDA_HOME): the CUDA sources are compiled too"
  fi
fi

SRC="$VENV/src"
"$PY" "$ROOT/scripts/mirror_tree.py" "$ROOT" "$SRC"
say "building in $SRC (MAX_JOBS=$MAX_JOBS)"
(cd "$SRC" && "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$VENV/build.log" 2>&1) \
  || { tail -n 40 "$VENV/build.log"; say "build FAILED (log: $VENV/build.log)"; exit 1; }
cd "$SRC"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider --benchmark-disable ${ARGS:-}
