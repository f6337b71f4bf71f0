"""`python -m bench bandwidth`, `paired`, `attention` and `gemm` run end to end; timing values are not
asserted (speed is shown by benchmarks, never by tests)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tool,select,row,footer", [
    ("bandwidth", "ostrack256-R1/bfloat16", "| topk_select | ostrack256-R1/bfloat16 |", "case(s) below target"),
    ("paired", "proj/B1/float32", "| proj | 1 | float32 |", "case(s) off target"),
    ("attention", "ce-153/bfloat16", "| ce-153 | bfloat16 |", "case(s) where the kernel is slower"),
    ("gemm", "fc1/B1/bfloat16", "| fc1 | 1 | bfloat16 |", "case(s) where the panel GEMM is slower"),
])
def test_tool_runs_and_reports_each_selected_case(tool, select, row, footer):
    r = subprocess.run([sys.executable, "-m", "bench", tool, "--rounds", "1", "-k", select],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    headers = ("| op", "| layer", "| linear", "| shape", "|---")
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith(headers)]
    assert len(rows) == 1 and rows[0].startswith(row)
    assert footer in r.stdout
