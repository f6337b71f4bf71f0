#!/usr/bin/env bash
# `make gpu-check [OUT=DIR]` (= scripts/gpu_check.sh [DIR]): the one check to run on a machine with a
# GPU, sized for a 15-minute lease (about 8 minutes on 16 cores). It uses the machine's own Python
# (PYTHON, default python3) and installs nothing from a network:
#   1. build   fasttrack in place (`pip install --no-build-isolation --no-deps --no-index -e .`),
#              CUDA kernels for this GPU's architecture only, MAX_JOBS = cores;
#   2. info    `python -m fasttrack.info`;
#   3. check   `python -m fasttrack.check --device cuda` (every op, tracker shapes, fp32/fp16/bf16,
#              forward and backward, against the reference);
#   4. tests   the device tests: every "cuda" parity case of the op tests and tests/test_gpu_path.py
#              (sync-free forwards, CUDA-graph replays, networks on the GPU);
#   5. sanitize `compute-sanitizer --tool memcheck` over one call of each CUDA C++ kernel, bad
#              indices included (scripts/gpu_sanitize.py);
#   6. bench   the GPU benchmarks in their quick form (`python -m bench --device cuda --quick`):
#              the ops at B=1 without the compile providers, then the trackers (BENCH_TRACKERS).
# Everything (one log per step, bench/results.json, the charts, summary.md) goes under DIR (default:
# $OUT if set, else ./gpu_check_results). The last thing printed is a summary table.
# Without a CUDA device it builds, runs the CPU parts it can, says so, and exits with status 2.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${OUT:-$ROOT/gpu_check_results}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BENCH_TRACKERS="${BENCH_TRACKERS:-tracker and B1 and fp16 and (ostrack-B1 or compresstracker or utptrack)}"

ROWS=()
FAILED=0
say() { printf '[gpu-check] %s\n' "$*"; }
# run NAME LIMIT_S CMD...: one step, its output in DEST/NAME.log; records a summary row
run() {
  local name="$1" limit="$2"; shift 2
  local t0 rc detail
  t0=$(date +%s)
  say "$name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$DEST/$name.log" 2>&1
  rc=$?
  detail="$(tail -n 1 "$DEST/$name.log" | cut -c1-90)"
  if [ "$rc" -eq 0 ]; then
    ROWS+=("| $name | ok | $(( $(date +%s) - t0 )) | $detail |")
  else
    [ "$rc" -eq 124 ] && detail="timed out after ${limit}s; $detail"
    ROWS+=("| $name | FAILED ($rc) | $(( $(date +%s) - t0 )) | $detail |")
    FAILED=1
    tail -n 25 "$DEST/$name.log" | sed 's/^/    /'
  fi
  return "$rc"
}
skip() { ROWS+=("| $1 | skipped | 0 | $2 |"); }

summary() {
  {
    echo "| step | result | seconds | last line of the log |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
  } >"$DEST/summary.md"
  echo
  cat "$DEST/summary.md"
  echo
  say "logs and results in $DEST"
}

# --- the machine --------------------------------------------------------------------------------
"$PY" - >"$DEST/machine.log" 2>&1 <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton, numpy
    print(f"triton {triton.__version__}, numpy {numpy.__version__}")
except Exception as e:
    print(f"triton/numpy: {e}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB")
else:
    print("GPU: none")
EOF
cat "$DEST/machine.log"
ARCH="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}.{c[1]}" if c else "")' 2>/dev/null)"
if [ -z "$ARCH" ]; then
  say "NO CUDA DEVICE: this machine has no GPU that torch can use. Running the CPU parts only;"
  say "the GPU steps are skipped and the check exits with status 2. Nothing below ran on a GPU."
fi

# --- 1. build -----------------------------------------------------------------------------------
if [ -n "$ARCH" ]; then
  # shellcheck source=scripts/cuda_env.sh
  . "$ROOT/scripts/cuda_env.sh"
  if CUDA_HOME="$(find_cuda_home)"; then
    export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH"
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    MAJOR="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    # torch's own CUDA headers (cusparse.h, ...) can come from its nvidia-* wheels
    [ -d "$SITE/nvidia/cu$MAJOR/include" ] && export CPATH="$SITE/nvidia/cu$MAJOR/include${CPATH:+:$CPATH}"
    say "CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$MAX_JOBS"
  else
    say "no CUDA toolkit found: building without the CUDA C++ kernels"
  fi
fi
run build 420 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . \
  || { say "build failed: stopping"; summary; exit 1; }

# --- 2. info, 3. check ----------------------------------------------------------------------------
run info 120 "$PY" -m fasttrack.info
if [ -n "$ARCH" ]; then
  run check 300 "$PY" -m fasttrack.check --device cuda --dtype float32,float16,bfloat16
else
  run check 300 "$PY" -m fasttrack.check --device cpu --dtype float32 --kernel native
fi

# --- 4. device tests ------------------------------------------------------------------------------
if [ -n "$ARCH" ]; then
  run tests 420 "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable -rs \
    tests/test_gpu_path.py tests/test_topk_select.py tests/test_merge_tokens.py tests/test_pruned_linear.py \
    tests/test_pad_scatter.py -k "cuda or gpu_path"
else
  skip tests "no CUDA device"
fi

# --- 5. compute-sanitizer -------------------------------------------------------------------------
if [ -n "$ARCH" ] && command -v compute-sanitizer >/dev/null; then
  run sanitize 240 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" scripts/gpu_sanitize.py
elif [ -n "$ARCH" ]; then
  skip sanitize "compute-sanitizer not on PATH"
else
  skip sanitize "no CUDA device"
fi

# --- 6. GPU benchmarks (quick) ----------------------------------------------------------------------
if [ -n "$ARCH" ]; then
  run bench-ops 240 "$PY" -m bench --device cuda --quick --out "$DEST/bench-ops" -k "not tracker and not compile"
  run bench-trackers 300 "$PY" -m bench --device cuda --quick --out "$DEST/bench-trackers" -k "$BENCH_TRACKERS"
  for d in bench-ops bench-trackers; do [ -f "$DEST/$d/results.md" ] && { echo; echo "## $d"; cat "$DEST/$d/results.md"; }; done \
    >"$DEST/bench.md"
else
  skip bench "no CUDA device"
fi

summary
if [ -z "$ARCH" ]; then
  say "NO CUDA DEVICE: the GPU check did not run (exit 2)"
  exit 2
fi
exit "$FAILED"
