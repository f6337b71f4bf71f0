#!/usr/bin/env bash
# `make asan-test`: fasttrack's C++ kernels built with AddressSanitizer (FASTTRACK_SANITIZE=address),
# then the op, registry, output-cache, reliability and fuzz tests run against that build, with
# libasan preloaded into the (uninstrumented) Python process. Any heap / stack overflow,
# use-after-free or double free in the kernels aborts the run with ASan's report.
# Its own venv (.venv-asan: the same pins as the Makefile's) and a mirror of the working tree in
# <venv>/src, rebuilt incrementally; the repo's own build is not touched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${ASAN_VENV:-$ROOT/.venv-asan}"
DEPS="${ASAN_DEPS:-torch==2.13.0 triton==3.9.0 ninja pybind11 numpy pytest pytest-benchmark expecttest hypothesis setuptools wheel}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
say() { printf '[asan-test] %s\n' "$*"; }

STAMP="$VENV/.fasttrack-deps"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ]; then
  say "creating $VENV: $DEPS"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $DEPS
  echo "$DEPS" >"$STAMP"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
SRC="$VENV/src"
"$PY" "$ROOT/scripts/mirror_tree.py" "$ROOT" "$SRC"
say "building with -fsanitize=address in $SRC (MAX_JOBS=$MAX_JOBS)"
(cd "$SRC" && FASTTRACK_SANITIZE=address "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  >"$VENV/build.log" 2>&1) || { tail -n 40 "$VENV/build.log"; say "build FAILED"; exit 1; }
LIBASAN="$("${CXX:-c++}" -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { say "libasan.so not found (${CXX:-c++} -print-file-name)"; exit 1; }
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor must find the real one
# when it starts (else the first C++ exception a kernel throws aborts with "real___cxa_throw != 0")
LIBSTDCXX="$("${CXX:-c++}" -print-file-name=libstdc++.so.6)"
say "running the tests with LD_PRELOAD=$LIBASAN $LIBSTDCXX"
cd "$SRC"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1:symbolize=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
LD_PRELOAD="$LIBASAN $LIBSTDCXX" "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable \
  tests/test_topk_select.py tests/test_merge_tokens.py tests/test_pad_scatter.py tests/test_pruned_linear.py tests/test_attention.py \
  tests/test_registry.py tests/test_output_cache.py tests/test_reliability.py tests/test_fuzz.py tests/test_nn_vit.py tests/test_layer_norm.py tests/test_panel_linear.py \
  -k "not triton" ${ARGS:-}
say "ASan: no error in the kernels"
