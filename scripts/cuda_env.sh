# Sourced by scripts/*.sh: find the CUDA toolkit, the directory whose include/ holds cuda_runtime.h.
# The nvcc first on PATH may be a wrapper script, so its own location proves nothing; nvcc --dryrun
# prints the toolkit root it really runs from (TOP=...). Defines has_runtime and find_cuda_home;
# find_cuda_home prints the directory, or nothing (exit 1) when there is no toolkit.
has_runtime() { [ -n "${1:-}" ] && [ -f "$1/include/cuda_runtime.h" ]; }
find_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then
    has_runtime "$CUDA_HOME" || { echo "CUDA_HOME=$CUDA_HOME has no include/cuda_runtime.h" >&2; return 1; }
    echo "$CUDA_HOME"; return 0
  fi
  local nvcc top
  nvcc="$(command -v nvcc || true)"
  if [ -z "$nvcc" ]; then
    has_runtime /usr/local/cuda && { echo /usr/local/cuda; return 0; }
    echo "no nvcc on PATH and no CUDA_HOME" >&2; return 1
  fi
  top="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)"
  if [ -n "$top" ] && has_runtime "$top"; then (cd "$top" && pwd -P); return 0; fi
  top="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
  has_runtime "$top" && { echo "$top"; return 0; }
  echo "cannot find the CUDA toolkit of $nvcc: set CUDA_HOME to the directory whose include/ holds cuda_runtime.h" >&2
  return 1
}
