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


def test_fused_networks_run_without_onednn_bf16():
    """oneDNN's bf16 GEMMs need AVX-512 (or AVX-NE-CONVERT); on an AVX2-only CPU packing a bf16 weight
    raises. ONEDNN_MAX_CPU_ISA=AVX2 emulates such a CPU: every family's fused bf16 network must run
    (bf16 then takes F.linear) and match its reference as on any machine."""
    code = (
        "import torch\n"
        "from fasttrack import zoo\n"
        "for fam in zoo.FAMILIES:\n"
        "    c = zoo.build(fam, 1, torch.bfloat16, depth=4)\n"
        "    with torch.no_grad():\n"
        "        r = c.parity(c.reference(*c.inputs), c.fused(*c.inputs))\n"
        "    assert r['index_agreement'] is None or r['index_agreement'] >= 0.9, (fam, r)\n"
        "    print(fam, 'ok')\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
