"""The CPU kernels pick their vector ISA at run time (csrc/include/fasttrack/cpu_isa.h): what the CPU
has, capped by ATen's ATEN_CPU_CAPABILITY. The rest of the suite runs the best paths of the machine
it is on; these runs cap the ISA in a subprocess so the AVX2 and baseline kernels are checked too on
an AVX-512 machine: every op at the tracker shapes, forward and backward, in every float dtype
(`python -m fasttrack.check --kernel native`), plus gather/scatter's B=32 and streamed paths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrack import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="needs the native extension fasttrack._C")

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["baseline", "avx2", "avx512"]
CAPS = {"avx2": "avx2", "default": "baseline"}  # ATEN_CPU_CAPABILITY -> the level fasttrack then uses


def _run(cap, *argv):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("cap", list(CAPS))
def test_capped_isa_kernels_match_reference(cap):
    level = CAPS[cap]
    if LEVELS.index(_extension._C.cpu_isa()) <= LEVELS.index(level):
        pytest.skip(f"this machine's level is {_extension._C.cpu_isa()}: the suite already runs these paths")
    got = _run(cap, "-c", "import fasttrack._C as C; print(C.cpu_isa())")
    assert got.returncode == 0 and got.stdout.strip() == level, got.stderr
    check = _run(cap, "-m", "fasttrack.check", "--kernel", "native", "--dtype", "float32,float16,bfloat16")
    assert check.returncode == 0 and " 0 failed" in check.stdout, check.stdout[-3000:] + check.stderr[-3000:]
    parity = _run(cap, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pad_scatter.py",
                  "-k", "matches_reference or channel_tails")
    assert parity.returncode == 0, parity.stdout[-3000:] + parity.stderr[-3000:]
